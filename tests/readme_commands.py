"""Read the commands a user finds in README.md, and turn each into a test-sized one.

Commands come from fenced code blocks (one per line, ``\\`` continuations joined, ``&&`` chains split), from
inline code spans anywhere in the text that start with ``python``/``bash`` (or ``<benchmark>.py ...``), and
from override fragments in table rows (``logger=csv``, ``trainer=gpu``), which stand for
``python train.py experiment=vae <fragment>``. ``tests/test_readme.py`` runs or composes each of them.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import compose_train

ROOT = Path(__file__).resolve().parents[1]
COMMAND_WORDS = ("python ", "python3 ", "bash ", "pip ", ". ", "sbatch ")
OVERRIDE = re.compile(r"^[+~]?[\w/.]+=[^\s`]+$")

# Lines that are not runnable in a test, each with the reason (matched as a substring of the command).
NOT_RUN = {
    "python3 -m venv": "environment setup (the CI script .ci/run does exactly this in a fresh venv)",
    "pip install": "installs packages from the network (.ci/run runs it)",
    ". .venv/bin/activate": "environment setup (.ci/run)",
    "python -m pytest tests": "the test suite itself",
    "lora_step.py --resolution 256": "full-size SD v1.5 UNet + VAE + CLIP ViT-L/14 (GiBs, minutes per step on CPU)",
    "python benchmarks/memory.py": "SD v1.5-shaped UNet fine-tuning steps at 512 px (~14 GB RSS, minutes on CPU)",
    "sbatch ": "submits to a SLURM cluster (the train.py overrides it forwards are the cookbook's)",
    "lora_step.py --model embedded": "spawns one fresh process per variant for clean memory peaks (~40 s even "
                                     "shortened); its measuring code runs in test_readme.py::test_lora_step_variant",
}
# Paths a user has and a test does not: commands with them are composed / argument-parsed, not run.
USER_FILES = ("/models/", "/data/my_concept", "runwayml/")
# Placeholders a test can fill: the image folder and files of earlier runs.
IMAGE_FOLDER = "/path/to/images"


@dataclass
class Command:
    text: str                      # as in the README
    argv: list[str] = field(default_factory=list)

    @property
    def program(self) -> str:
        words = [w for w in self.argv if w not in ("python", "python3", "bash", "-m")]
        return words[0] if words else ""

    @property
    def not_run_reason(self) -> str | None:
        for key, reason in NOT_RUN.items():
            if key in self.text:
                return reason
        return None

    @property
    def needs_user_files(self) -> bool:
        return any(marker in self.text for marker in USER_FILES)

    @property
    def needs_gpu(self) -> bool:
        return bool(re.search(r"\btrainer=(gpu|ddp|fsdp|deepspeed)\b", self.text)) or "--device cuda" in self.text


def _split_block(block: str) -> list[str]:
    lines = block.replace("\\\n", " ").splitlines()
    commands = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#") or not line.startswith(COMMAND_WORDS):
            continue
        commands.extend(part.strip() for part in line.split("&&") if part.strip())
    return commands


def _table_fragments(text: str) -> list[str]:
    """Override fragments in table rows (``logger=csv``) -> ``python train.py experiment=vae <fragment>``."""
    commands = []
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        for span in re.findall(r"`([^`\n]+)`", line):
            if OVERRIDE.match(span):
                commands.append(f"python train.py experiment=vae {span}")
    return commands


def _benchmark_span(span: str) -> str | None:
    name = span.split()[0]
    if name.endswith(".py") and " " in span and (ROOT / "benchmarks" / name).is_file():
        return f"python benchmarks/{span}"
    return None


def readme_commands(readme: Path = ROOT / "README.md") -> list[Command]:
    text = readme.read_text()
    found: list[str] = []
    for lang, block in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.DOTALL):
        if lang in ("", "bash", "sh", "console", "shell"):
            found.extend(_split_block(block))
    prose = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    for span in re.findall(r"`([^`\n]+)`", prose):
        if span.startswith(("python ", "python3 ", "bash ")):
            found.append(span)
        elif (bench := _benchmark_span(span)) is not None:
            found.append(bench)
    found.extend(_table_fragments(text))
    unique = list(dict.fromkeys(" ".join(c.split()) for c in found))
    return [Command(c, shlex.split(c)) for c in unique]


def given_keys(overrides: list[str]) -> set[str]:
    """Config keys/groups the user set: ``model/vae=f8`` -> ``model/vae``, ``+a.b=1`` -> ``a.b``."""
    return {o.lstrip("+~").split("=", 1)[0] for o in overrides if "=" in o}


def tiny_overrides(cfg, given: set[str], cache_dir: Path) -> list[str]:
    """Overrides that make any experiment test-sized, chosen from what its composed config has."""
    out = []
    model, data = cfg.model, cfg.data
    for part in ("unet", "vae"):
        if part in model and f"model/{part}" not in given:
            out.append(f"model/{part}=tiny")
    if "sampler" in model and "model/sampler" not in given:
        out += ["model/sampler=ddim", "model.sampler.steps=2"]
    if "log_prompts" in model and "model.log_prompts" not in given:
        out.append("model.log_prompts=[a_red_star]")
    sizes = {"train_size": 16, "val_size": 4, "batch_size": 4, "num_workers": 0}
    for prefix in ("data", "data.source", "data.regularization"):
        node = data if prefix == "data" else data.get(prefix.split(".", 1)[1])
        if node is None:
            continue
        out += [f"{prefix}.{k}={v}" for k, v in sizes.items() if k in node and f"{prefix}.{k}" not in given]
    if "regularization_size" in data and "data.regularization_size" not in given:
        out.append("data.regularization_size=8")
    if "cache_dir" in data and "data.cache_dir" not in given:
        out.append(f"data.cache_dir={cache_dir}")
    return out


SHORT = {  # appended arguments (argparse: the last value wins)
    "sample.py": ["--n", "1", "--steps", "2"],
    "benchmarks/fidelity.py": ["--n", "2", "--samplers", "ddim-2"],
    "benchmarks/unet_step.py": ["--batch", "2", "--steps", "1", "--warmup", "0", "--context-length", "8",
                                "--peak-size", "256"],
}


def env() -> dict:
    out = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out.pop("WANDB_API_KEY", None)
    return out


def tiny_for(overrides: list[str], workdir: Path) -> list[str]:
    """Test-size overrides for ``train.py <overrides>`` (sweep values reduced to their first choice)."""
    single = [re.sub(r"=([^,\[]+),.*$", r"=\1", o) for o in overrides if o != "-m"]
    cfg = compose_train(workdir / "compose", single)
    return tiny_overrides(cfg, given_keys(single), workdir / "cache")


def run_embedded_chain(root: Path) -> Path:
    """``bash scripts/embedded_chain.sh``, shortened: tiny VAE -> txt2img -> LoRA, fidelity and samples, with
    logs under ``root/logs`` and figures under ``root/docs`` (the conftest fixture ``embedded_chain``)."""
    stage = {name: " ".join(tiny_for([f"experiment={name}"], root))
             for name in ("vae", "txt2img", "lora_finetune")}
    variables = {"LDM_ROOT": str(root), "DOCS": str(root / "docs"), "VAE_ARGS": stage["vae"],
                 "TXT2IMG_ARGS": stage["txt2img"], "LORA_ARGS": stage["lora_finetune"],
                 "FIDELITY_ARGS": " ".join(SHORT["benchmarks/fidelity.py"]),
                 "SAMPLE_ARGS": " ".join(SHORT["sample.py"])}
    result = subprocess.run(["bash", "scripts/embedded_chain.sh", "debug=smoke", "callbacks.rich_progress_bar=null"],
                            cwd=ROOT, env={**env(), **variables}, capture_output=True, text=True, timeout=600,
                            check=False)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return root
