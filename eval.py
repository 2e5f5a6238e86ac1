"""Evaluation entry point: `python eval.py` (see conf/eval.yaml). All work is in dq.tasks.evaluate."""
import hydra

from dq import cli
from dq.tasks.common import main


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def evaluate(cfg):
    return main(cfg)


if __name__ == "__main__":
    cli.run("eval", evaluate)
