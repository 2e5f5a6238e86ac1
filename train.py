"""Train entry point: `python train.py` (see conf/train.yaml). Thin by design: all work is in dq.tasks."""
import hydra

from dq import cli
from dq.tasks.common import main


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def train(cfg):
    return main(cfg)


if __name__ == "__main__":
    cli.run("train", train)
