"""Train an adapter: ``python train.py backbone=vit adapter=lora task=vtab task.dataset=cifar``.

Hydra composes conf/train.yaml; everything else lives in tasks/ (Lightning) and zoo/ (the library).
Lightning, torch and the tasks are imported only once the config is composed: ``--help`` and config
mistakes answer without loading them.
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


def check_config(cfg: DictConfig) -> None:
    """Resolve the task, data, backbone and adapter groups: a wrong value (an unknown VTAB task, a missing
    image folder) fails here, in a fraction of a second."""
    from omegaconf import OmegaConf

    for group in ("task", "data", "backbone", "adapter"):
        if group in cfg:
            OmegaConf.to_container(cfg[group], resolve=True)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from tasks.errors import user_errors

    with user_errors():
        check_config(cfg)
        from tasks.runner import train  # Lightning, torch, timm: seconds to import

        metrics = train(cfg)
    return (metrics.get("monitor") or {}).get("value")  # the value a sweeper optimises (the task's monitor)


if __name__ == "__main__":
    from tasks.sweeps import remove_if_empty

    try:
        main()
    finally:
        remove_if_empty()
