"""Train an adapter: ``python train.py backbone=vit adapter=lora task=vtab task.dataset=cifar``.

Hydra composes conf/train.yaml; everything else lives in tasks/ (Lightning) and zoo/ (the library).
"""
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT))

from tasks.runner import register_resolvers, train, user_errors  # noqa: E402

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    with user_errors():
        metrics = train(cfg)
    return (metrics.get("monitor") or {}).get("value")  # the value a sweeper optimises (the task's monitor)


if __name__ == "__main__":
    main()
