"""Teacher pairs for the SFT warm start of a DUET writer (`train_sft.py --source jsonl --pairs FILE`): for training
targets, the writer's chat prompt as the GRPO environment builds it, and a profile in DUET's format written by a
template from what that prompt shows (the user's average rating and the item's title), never from the target's
rating. The user profile states the rounded average ("Usually rates 4/5."), the one fact a profile derived from
a short history was found to move the recommender with (results/README.md, profile headroom), or with
`--teacher attributes` a rating for the target read off the shown history ("Would rate this album about 2/5.":
the user's ratings of albums sharing its mood and genre; synthetic catalogue only).

    python scripts/make_sft_pairs.py --data out/data/synthetic --out pairs.jsonl --targets 64 \\
        --user-history 8 --item-history 3 --review-chars 60
    python scripts/make_sft_pairs.py --out pairs.jsonl --targets 1024 --user-history 50 --teacher attributes
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def teacher_completion(user_avg, item_title: str, prefix: str = "<user_profile><cue>", target_estimate=None) -> str:
    """The DUET answer of the template teacher, without the response prefix the writer's answer opens with. With
    `target_estimate` (a rating for this item from the user's ratings of similar ones) the user profile states
    that instead of the user's usual rating."""
    u = "unknown" if user_avg is None else f"{round(user_avg)}/5"
    if target_estimate is None:
        user = (f"<cue>usually rates {u}</cue><constructed_prompt>State the rating this user usually gives."
                f"</constructed_prompt><profile>Usually rates {u}.</profile>")
    else:
        t = f"{min(5, max(1, round(target_estimate)))}/5"
        user = (f"<cue>would rate this album {t}</cue><constructed_prompt>State the rating this user gives albums "
                f"of this mood and genre.</constructed_prompt><profile>Would rate this album about {t}.</profile>")
    answer = (f"<user_profile>{user}</user_profile>\n"
              f"<item_profile><cue>{item_title}</cue><constructed_prompt>Name the item.</constructed_prompt>"
              f"<profile>{item_title}.</profile></item_profile>")
    if not answer.startswith(prefix):
        raise ValueError(f"--response-prefix {prefix!r} does not open the teacher's answer")
    return answer[len(prefix):]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="", help="canonical dataset dir; empty: the synthetic default")
    p.add_argument("--out", required=True, help="JSONL file of {messages, completion}, written atomically")
    p.add_argument("--targets", type=int, default=64, help="training targets, in the trainers' seeded order")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--user-history", type=int, default=30)
    p.add_argument("--item-history", type=int, default=10)
    p.add_argument("--review-chars", type=int, default=200)
    p.add_argument("--response-prefix", default="<user_profile><cue>")
    p.add_argument("--teacher", choices=("average", "attributes"), default="average",
                   help="the user profile: the user's rounded average, or (synthetic titles) a rating for the target "
                        "from the shown ratings of albums sharing its mood and genre (eval.baselines.attribute_estimate)")
    a = p.parse_args(argv)

    from data import load_dataset
    from data.default import default_dataset_dir
    from data.history import HistoryIndex
    from data.io import write_text_atomic
    from eval.baselines import attribute_estimate
    from eval.profiles import HistoryOptions, item_title, profile_messages
    from rl.loop import step_indices

    ds = load_dataset(a.data or default_dataset_dir())
    hx = HistoryIndex(ds)
    hist = HistoryOptions(a.user_history, a.item_history, a.review_chars)
    train = [x for x in ds.split("train") if len(hx.user_history(x.user_id, x.timestamp, 5)) >= 5]  # as DuetEnv
    rows = []
    for i in step_indices(0, min(a.targets, len(train)), len(train), a.seed):
        x = train[i]
        title = item_title(ds, x.item_id)
        est = None
        if a.teacher == "attributes":  # from exactly the ratings the prompt shows
            est = attribute_estimate(hx.user_history(x.user_id, x.timestamp, a.user_history, review_chars=0), title)
            if est is None:
                raise SystemExit(f"--teacher attributes: item {x.item_id} of {a.data or 'the default dataset'} has "
                                 f"no '(mood genre, era)' title: {title!r}")
        rows.append({"messages": profile_messages("duet", hx, ds, x, hist),
                     "completion": teacher_completion(hx.user_average(x.user_id, x.timestamp), title,
                                                      a.response_prefix, est)})
    write_text_atomic(Path(a.out), "".join(json.dumps(r) + "\n" for r in rows))
    print(json.dumps({"pairs": len(rows), "out": a.out}))


if __name__ == "__main__":
    main()
