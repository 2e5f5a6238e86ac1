"""Export entry point: `python export.py ckpt_path=<student.safetensors> [out=DIR]` (see conf/export.yaml)."""
import hydra

from dq import cli
from dq.tasks.common import main


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def export(cfg):
    return main(cfg)


if __name__ == "__main__":
    cli.run("export", export)
