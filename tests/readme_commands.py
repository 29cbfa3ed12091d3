"""Read the commands a user finds in README.md and docs/*.md, and turn each into a test-sized one.

Commands come from fenced code blocks (one per line, ``\\`` continuations joined, ``&&`` chains split), from
inline code spans anywhere in the text that start with ``python``/``bash`` (or ``<benchmark>.py ...``), and
from override fragments in the ``command`` / ``key`` column of a table (``logger=csv``,
``model.gradient_checkpointing=true``), which stand for ``python train.py <base experiment> <fragment>``.
``tests/test_readme.py`` runs or composes each of them, on the earlier runs ``prior_runs`` makes once.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from tests.conftest import compose_train

ROOT = Path(__file__).resolve().parents[1]
COMMAND_WORDS = ("python ", "python3 ", "bash ", "pip ", ". ", "sbatch ", "torchrun ")
OVERRIDE = re.compile(r"^[+~]?[\w/.]+=[^\s`]+$")
# Table columns whose override fragments are commands, and the experiment each fragment is added to.
COMMAND_COLUMNS = {"command": "experiment=vae", "key": "experiment=lora_finetune"}
FRAGMENT_BASE = {"model.unet.": "experiment=txt2img"}  # keys of one model only

# Lines that are not runnable in a test, each with the reason (matched as a substring of the command).
NOT_RUN = {
    "python3 -m venv": "environment setup (the CI script .ci/run does exactly this in a fresh venv)",
    "pip install": "installs packages from the network (.ci/run runs it)",
    ". .venv/bin/activate": "environment setup (.ci/run)",
    "python -m pytest tests": "the test suite itself",
    "lora_step.py --resolution 256": "full-size SD v1.5 UNet + VAE + CLIP ViT-L/14 (GiBs, minutes per step "
    "on CPU)",
    "python benchmarks/memory.py": "SD v1.5 / SDXL UNet fine-tuning steps at 512-1024 px (6-14 GB RSS, "
    "minutes on CPU); its SDXL mode runs tiny in tests/test_sdxl_demo.py",
    "python benchmarks/sdxl_crops.py": "samples a trained experiment=txt2img_sdxl checkpoint at 5 size "
    "conditions (minutes on CPU); its criterion and sampling run tiny in tests/test_sdxl_demo.py",
    "python benchmarks/load_memory.py": "writes a 2 GiB fp16 SD v1.5 file and loads it twice (~6 GiB RSS "
    "each); its loader is ldm.io's, tested in test_interop_single_file.py",
    "python benchmarks/savers_curve.py": "9 fine-tunes of the embedded task (minutes each on CPU); run at "
    "test size by tests/test_scale_benchmarks.py",
    "python benchmarks/bf16_cpu.py": "SD v1.5 UNet steps in three precisions (minutes on CPU); run at test "
    "size by tests/test_scale_benchmarks.py",
    "python benchmarks/convergence.py": "the objective-options grid: a VAE and 10 txt2img runs of up to "
    "2,000 steps (CPU hours); run end to end at test size by tests/test_convergence.py",
    "python benchmarks/methods.py": "the fine-tuning methods grid: 14 runs x 3 seeds of 250-3,000 steps "
    "each on a txt2img base (CPU hours); run end to end at test size by tests/test_methods_grid.py",
    "sbatch ": "submits to a SLURM cluster (the train.py overrides it forwards are the cookbook's)",
    "python benchmarks/threads.py": "starts busy processes and times 36 fresh processes (minutes); its steps "
    "and its table run in tests/test_threads.py",
    "sd_xl_refiner_1.0.safetensors": "the released SDXL refiner (6 GB) and an image of the base; the refiner "
    "loads, samples img2img and matches diffusers tiny in tests/test_sdxl_refiner.py",
    "lora_step.py --model embedded": "spawns one fresh process per variant for clean memory peaks (~40 s "
    "even shortened); its measuring code runs in test_readme.py::test_lora_step_variant",
}
# Commands a test composes / argument-parses but does not run, with the reason.
COMPOSE_ONLY = {
    "model/optimizer=adamw8bit": "needs bitsandbytes (optional, not in the dev extra: CUDA builds); "
    "test_finetune_lora.py checks the error that names the install command",
    "python benchmarks/data_loading.py": "generates 20,000 JPEGs and times fresh processes; its parts run "
    "in-process, tiny, in test_shards.py::test_data_loading_benchmark_cases_run",
}
# Paths a user has and a test does not: commands with them are composed / argument-parsed, not run.
USER_FILES = ("/models/", "runwayml/")


@dataclass
class Command:
    text: str  # as in the README
    argv: list[str] = field(default_factory=list)

    @property
    def program(self) -> str:
        if "train.py" in self.argv:
            return "train.py"
        words = [w for w in self.argv if w not in ("python", "python3", "bash", "-m")]
        return words[0] if words else ""

    @property
    def not_run_reason(self) -> str | None:
        return next((reason for key, reason in NOT_RUN.items() if key in self.text), None)

    @property
    def compose_only_reason(self) -> str | None:
        return next((reason for key, reason in COMPOSE_ONLY.items() if key in self.text), None)

    @property
    def needs_user_files(self) -> bool:
        return any(marker in self.text for marker in USER_FILES)

    @property
    def needs_gpu(self) -> bool:
        return (
            bool(re.search(r"\btrainer=(gpu|ddp|fsdp|deepspeed)\b", self.text))
            or "--device cuda" in self.text
            or self.text.startswith("torchrun ")
        )


def _split_block(block: str) -> list[str]:
    lines = block.replace("\\\n", " ").splitlines()
    commands = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#") or not line.startswith(COMMAND_WORDS):
            continue
        commands.extend(part.strip() for part in line.split("&&") if part.strip())
    return commands


def _cells(line: str) -> list[str]:
    """A table row's cells (a ``|`` inside a code span does not split)."""
    return [c.strip() for c in re.split(r"\|(?=(?:[^`]*`[^`]*`)*[^`]*$)", line.strip().strip("|"))]


def _fragment_command(span: str, base: str) -> str | None:
    words = span.split()
    if not words or not all(OVERRIDE.match(w) for w in words):
        return None
    base = next((b for key, b in FRAGMENT_BASE.items() if span.startswith(key)), base)
    return f"python train.py {base} {span}"


def _table_fragments(text: str) -> list[str]:
    """Override fragments in a table's command/key column -> ``python train.py <base> <fragment>``."""
    commands, header, previous = [], None, ""
    for line in text.splitlines():
        if not line.startswith("|"):
            header, previous = None, line
            continue
        if not previous.startswith("|"):
            header = [c.lower() for c in _cells(line)]
        previous = line
        for column, cell in zip(header or [], _cells(line)):
            if column not in COMMAND_COLUMNS:
                continue
            for span in re.findall(r"`([^`\n]+)`", cell):
                if (command := _fragment_command(span, COMMAND_COLUMNS[column])) is not None:
                    commands.append(command)
    return commands


def _benchmark_span(span: str) -> str | None:
    name = span.split()[0]
    if name.endswith(".py") and " " in span and (ROOT / "benchmarks" / name).is_file():
        return f"python benchmarks/{span}"
    return None


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # every page a user reads commands from


def readme_commands(pages: list[Path] | Path = DOCS) -> list[Command]:
    """The commands of ``pages`` (README.md and docs/*.md), each once, in page order."""
    pages = [pages] if isinstance(pages, Path) else pages
    text = "\n\n".join(page.read_text() for page in pages)
    found: list[str] = []
    for lang, block in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.DOTALL):
        if lang in ("", "bash", "sh", "console", "shell"):
            found.extend(_split_block(block))
    prose = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    for span in re.findall(r"`([^`]+)`", prose):  # a span may wrap onto the next line
        span = " ".join(span.split())
        if span.startswith(("python ", "python3 ", "bash ")):
            found.append(span)
        elif (bench := _benchmark_span(span)) is not None:
            found.append(bench)
    found.extend(_table_fragments(text))
    unique = list(dict.fromkeys(" ".join(c.split()) for c in found))
    # a placeholder with spaces (`<txt2img last.ckpt>`) is one argument
    return [
        Command(c, shlex.split(re.sub(r"<[^<>]*>", lambda m: m.group(0).replace(" ", "_"), c)))
        for c in unique
    ]


def given_keys(overrides: list[str]) -> set[str]:
    """Config keys/groups the user set: ``model/vae=f8`` -> ``model/vae``, ``+a.b=1`` -> ``a.b``."""
    return {o.lstrip("+~").split("=", 1)[0] for o in overrides if "=" in o}


def _data_overrides(data, given: set[str], cache_dir: Path) -> list[str]:
    out = []
    sizes = {"train_size": 16, "val_size": 4, "batch_size": 4, "num_workers": 0}
    for prefix in ("data", "data.source", "data.regularization"):
        node = data if prefix == "data" else data.get(prefix.split(".", 1)[1])
        if node is None:
            continue
        out += [
            f"{prefix}.{k}={v}"
            for k, v in sizes.items()
            if k in node and node[k] is not None and f"{prefix}.{k}" not in given
        ]
        # the real-image presets' 512 px
        if (
            "resolution" in node
            and not OmegaConf.is_interpolation(node, "resolution")
            and node.resolution > 64
            and f"{prefix}.resolution" not in given
        ):
            out.append(f"{prefix}.resolution=32")
    if "regularization_size" in data and "data.regularization_size" not in given:
        out.append("data.regularization_size=8")
    for i, concept in enumerate(data.get("concepts") or []):  # DreamBooth: 2 instance and 2 class images
        out += [
            f"data.concepts.{i}.{k}=2" for k in ("num_instance_images", "num_class_images") if k in concept
        ]
    if "class_images" in data:
        out += [
            "data.class_images.steps=2",
            "data.class_images.sampler=ddim",
            f"data.class_images.cache_dir={cache_dir / 'class_images'}",
        ]
    if "cache_dir" in data and "data.cache_dir" not in given:
        out.append(f"data.cache_dir={cache_dir}")
    return out


def tiny_overrides(cfg, given: set[str], cache_dir: Path) -> list[str]:
    """Overrides that make any experiment test-sized, chosen from what its composed config has."""
    out = []
    model = cfg.model
    for part in ("unet", "vae"):
        if part == "unet" and "unet" in model and model.unet.get("adm_in_channels"):
            # an SDXL-architecture UNet: its experiment's is already test-sized (model/unet=sdxl_tiny)
            continue
        if part in model and f"model/{part}" not in given:
            out.append(f"model/{part}=tiny")
    if "sampler" in model and "model/sampler" not in given:
        out += ["model/sampler=ddim", "model.sampler.steps=2"]
    if "log_prompts" in model and "model.log_prompts" not in given:
        out.append("model.log_prompts=[a_red_star]")
    if "model.compile" in given and "compile_backend" in model:  # graph capture only (see SHORT)
        out.append("model.compile_backend=aot_eager")
    return out + _data_overrides(cfg.data, given, cache_dir)


SHORT = {  # appended arguments (argparse: the last value wins)
    # compiling: graph capture only (inductor's C++ builds take minutes; test_compile.py runs inductor once)
    "sample.py": ["--n", "1", "--steps", "2", "--compile-backend", "aot_eager"],
    "benchmarks/compile_step.py": ["--batch", "2", "--steps", "1", "--backend", "aot_eager"],
    "benchmarks/fidelity.py": ["--n", "2", "--samplers", "ddim-2"],
    "benchmarks/unet_step.py": [
        "--batch",
        "2",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--context-length",
        "8",
        "--peak-size",
        "256",
        "--compile-backend",
        "eager",
    ],
    "benchmarks/subject_fidelity.py": ["--n", "2", "--sampler", "ddim", "--steps", "2"],
    "benchmarks/dreambooth_step.py": ["--batch", "2", "--steps", "2", "--warmup", "1", "--in-process"],
    "benchmarks/sampling.py": [
        "--samplers",
        "ddim,euler",
        "--batch",
        "1",
        "--steps",
        "2",
        "--repeats",
        "1",
        "--n",
        "2",
        "--fidelity-steps",
        "2",
    ],
    "scripts/make_shards.py": ["--train-size", "8", "--val-size", "2"],
    "benchmarks/clip_retrieval.py": ["--n", "8"],
    "scripts/evaluate.py": ["--n", "1", "--sampler", "ddim", "--steps", "2"],
}


def env() -> dict:
    """The environment of README commands run as subprocesses; ``python`` in a script (embedded_chain.sh) is
    the interpreter running the tests, also when pytest was started as ``.venv/bin/python -m pytest``."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    out = {
        **os.environ,
        "PATH": path,
        "WANDB_MODE": "offline",
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    out.pop("WANDB_API_KEY", None)
    return out


def tiny_for(overrides: list[str], workdir: Path) -> list[str]:
    """Test-size overrides for ``train.py <overrides>`` (sweep values reduced to their first choice)."""
    single = [re.sub(r"=([^,\[]+),.*$", r"=\1", o) for o in overrides if o != "-m"]
    cfg = compose_train(workdir / "compose", single)
    return tiny_overrides(cfg, given_keys(single), workdir / "cache")


def run_embedded_chain(root: Path) -> Path:
    """``bash scripts/embedded_chain.sh``, shortened: tiny VAE -> CLIP -> txt2img -> LoRA, fidelity and
    samples, with logs under ``root/logs`` and figures under ``root/docs`` (the conftest fixture
    ``embedded_chain``)."""
    stage = {
        name: " ".join(tiny_for([f"experiment={name}"], root))
        for name in ("vae", "clip", "txt2img", "lora_finetune")
    }
    variables = {
        "LDM_ROOT": str(root),
        "DOCS": str(root / "docs"),
        "VAE_ARGS": stage["vae"],
        "CLIP_ARGS": stage["clip"],
        "TXT2IMG_ARGS": stage["txt2img"],
        "LORA_ARGS": stage["lora_finetune"],
        "FIDELITY_ARGS": " ".join(SHORT["benchmarks/fidelity.py"]),
        "SAMPLE_ARGS": " ".join(SHORT["sample.py"]),
    }
    result = subprocess.run(
        ["bash", "scripts/embedded_chain.sh", "debug=smoke", "callbacks.rich_progress_bar=null"],
        cwd=ROOT,
        env={**env(), **variables},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return root
