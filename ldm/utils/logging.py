"""A rank-aware logger: messages from non-zero ranks are dropped unless asked for."""

from __future__ import annotations

import logging

from lightning.pytorch.utilities import rank_zero_only


class _RankZeroAdapter(logging.LoggerAdapter):
    def log(self, level, msg, *args, rank_zero: bool = True, **kwargs):
        if self.isEnabledFor(level) and (not rank_zero or rank_zero_only.rank == 0):
            msg, kwargs = self.process(msg, kwargs)
            self.logger.log(level, msg, *args, **kwargs)


def get_logger(name: str) -> logging.LoggerAdapter:
    """``log = get_logger(__name__)``; ``log.info(...)`` prints on rank zero only."""
    return _RankZeroAdapter(logging.getLogger(name), {})
