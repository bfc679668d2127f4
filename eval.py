"""Evaluate a saved adapter: ``python eval.py artifact=logs/runs/<run>/adapter [split=val]``.

The task kind, its task and data configs, the backbone and the head come from the artifact's
``adapter.json``; ``task.*`` / ``data.*`` on the command line override the recorded values
(e.g. ``data.root=/elsewhere``).
"""
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT))

from tasks.resolvers import register_resolvers  # noqa: E402

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from tasks.runner import evaluate, user_errors

    with user_errors():
        evaluate(cfg, overrides=list(HydraConfig.get().overrides.task))


if __name__ == "__main__":
    main()
