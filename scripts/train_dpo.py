"""LettinGo: explore candidate profiles, score them, build preference pairs, train the profile writer with DPO.

    python scripts/train_dpo.py                                    # cpu-demo: all stages, synthetic data
    python scripts/train_dpo.py --stage explore --explorers smollm2-135m-instruct Qwen/Qwen3-0.6B
    torchrun --nproc_per_node=8 scripts/train_dpo.py --preset lettingo-paper --data data/music --stage train

--stage all runs the four stages in order and skips a data stage whose file already exists in --run-dir.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from rl import distributed as dist  # noqa: E402
from rl import dpo_trainer, lettingo  # noqa: E402
from rl.config import run_cli  # noqa: E402

DATA_STAGES = {"explore": lettingo.stage_explore, "score": lettingo.stage_score, "pairs": lettingo.stage_pairs}


def run_stages(cfg, preset=None) -> dict:
    todo = dpo_trainer.STAGES if cfg.stage == "all" else (cfg.stage,)
    files = lettingo.files(cfg)
    data = [s for s in todo if s in DATA_STAGES and not (cfg.stage == "all" and files[s].exists())]
    if cfg.stage == "all" and os.environ.get("RANK", "0") == "0":
        for s in todo:
            if s in DATA_STAGES and s not in data:
                print(f"{s}: {files[s]} exists, skipped (delete it or run --stage {s} to redo)")
    if data:
        d = dist.setup(cfg.device or None, cfg.fsdp)
        torch.manual_seed(cfg.seed)
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        ds, hx = lettingo.dataset(cfg)
        for stage in data:
            DATA_STAGES[stage](cfg, d, ds, hx)
            if d.enabled:
                torch.distributed.barrier()
    if "train" not in todo:
        dist.teardown()
        return {}
    return dpo_trainer.train(cfg, preset)


def main(argv=None):
    run_cli(dpo_trainer.DPOConfig, dpo_trainer.PRESETS, run_stages, argv)


if __name__ == "__main__":
    main()
    dist.exit_if_distributed()
