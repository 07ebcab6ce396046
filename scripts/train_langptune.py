"""LangPTune: the profile writer and the recommender that reads its profiles, trained in alternation.

    python scripts/train_langptune.py                      # cpu-demo: synthetic data, SmolLM2-135M-Instruct
    python scripts/train_langptune.py --writer-steps 0     # the baseline: zero-shot profiles, recommender trained
    python scripts/train_langptune.py --preset langptune-paper --data data/music --run-dir runs/lpt
    python scripts/train_langptune.py --run-dir runs/langptune --resume --iterations 3
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rl.config import run_cli  # noqa: E402
from rl.distributed import exit_if_distributed  # noqa: E402
from rl.langptune_trainer import PRESETS, LangPTuneConfig, train  # noqa: E402


def main(argv=None):
    run_cli(LangPTuneConfig, PRESETS, train, argv)


if __name__ == "__main__":
    main()
    exit_if_distributed()
