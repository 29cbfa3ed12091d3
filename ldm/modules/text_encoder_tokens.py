"""Textual-inversion support of ``CLIPTextEncoder``: new tokens with grown embedding rows (``add_tokens``)
and (multi-vector) placeholder tokens (``add_placeholder``; prompts expand them in ``tokenize``).

A mixin: it reads the encoder's tokenizer (``_require_tokenizer``), ``token_embedding``, ``transformer``,
``placeholders`` and ``clear_cache`` from ``CLIPTextEncoder``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ldm.modules.adapters.token_embeddings import initial_vectors, placeholder_tokens


class PlaceholderTokens:
    """``CLIPTextEncoder``'s token-adding methods (see the module docstring)."""

    def add_tokens(self, tokens: Sequence[str], init_words: Sequence[str] | None = None) -> list[int]:
        """Add new tokens to the tokenizer and grow the token embedding; returns their ids.

        Row of token i = mean embedding of the tokens of ``init_words[i]`` (a single init word is used
        for all tokens); without ``init_words``, the mean of all existing rows. The module's frozen
        state is unchanged: textual inversion re-enables grad on ``token_embedding.weight`` itself.
        """
        tokenizer = self._require_tokenizer()
        tokens = [str(t) for t in tokens]
        if not tokens:
            return []
        vocab = tokenizer.get_vocab()
        clashes = [t for t in tokens if t in vocab]
        if clashes or len(set(tokens)) != len(tokens):
            raise ValueError(
                f"tokens must be new and distinct; already in the vocabulary or repeated: {clashes or tokens}"
            )
        if init_words is not None:
            init_words = [str(w) for w in init_words]
            if len(init_words) == 1:
                init_words = init_words * len(tokens)
            if len(init_words) != len(tokens):
                raise ValueError(f"got {len(init_words)} init_words for {len(tokens)} tokens")

        old = self.token_embedding
        weight = old.weight.detach()
        inits = []
        for i in range(len(tokens)):
            if init_words is None:
                inits.append(weight.mean(dim=0))
                continue
            ids = tokenizer(init_words[i], add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError(f"init word {init_words[i]!r} has no tokens")
            inits.append(weight[torch.as_tensor(ids, device=weight.device)].mean(dim=0))

        added = tokenizer.add_tokens(tokens)
        if added != len(tokens):
            raise RuntimeError(f"tokenizer added {added} of {len(tokens)} tokens {tokens}")
        new_ids = [int(i) for i in tokenizer.convert_tokens_to_ids(tokens)]
        num_rows = max(len(tokenizer), max(new_ids) + 1, weight.shape[0])

        grown = nn.Embedding(num_rows, weight.shape[1], device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            grown.weight[: weight.shape[0]] = weight
            for token_id, init in zip(new_ids, inits):
                grown.weight[token_id] = init
        grown.weight.requires_grad_(old.weight.requires_grad)
        self.transformer.text_model.embeddings.token_embedding = grown
        self.transformer.config.vocab_size = num_rows
        self.clear_cache()
        return new_ids

    def add_placeholder(
        self,
        token: str,
        num_vectors: int = 1,
        init_text: str | None = None,
        vectors: torch.Tensor | None = None,
    ) -> list[int]:
        """Add a (multi-vector) placeholder token; returns the ids of its ``num_vectors`` tokens.

        Prompts then expand ``token`` to ``token token_1 ... token_{n-1}`` (``tokenize``). Rows: ``vectors``
        ``[n, hidden]`` (a loaded embedding); else the embeddings of ``init_text``'s tokens, cycled over the n
        vectors (AUTOMATIC1111's initialisation); else random, N(mean, std) of the existing rows per
        dimension.
        """
        tokens = placeholder_tokens(token, num_vectors)
        n, weight = len(tokens), self.token_embedding.weight
        if vectors is not None:
            vectors = torch.as_tensor(vectors).detach()
            vectors = vectors.unsqueeze(0) if vectors.ndim == 1 else vectors
            if tuple(vectors.shape) != (n, weight.shape[1]):
                raise ValueError(
                    f"embedding for {token!r} has shape {tuple(vectors.shape)}, but this text encoder "
                    f"needs [{n}, {weight.shape[1]}] (hidden size {weight.shape[1]}): it was made for "
                    "another base model (SD1 CLIP ViT-L = 768, SD2 OpenCLIP = 1024)"
                )
        else:
            init_ids = None
            if init_text:
                init_ids = self._require_tokenizer()(init_text, add_special_tokens=False)["input_ids"]
                if not init_ids:
                    raise ValueError(f"initializer text {init_text!r} has no tokens")
            vectors = initial_vectors(weight, n, init_ids)
        ids = self.add_tokens(tokens)
        with torch.no_grad():
            self.token_embedding.weight[torch.as_tensor(ids, device=weight.device)] = vectors.to(weight)
        self.placeholders[tokens[0]] = tokens
        self.clear_cache()
        return ids
