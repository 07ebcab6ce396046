"""Every prompt of the project, in one place, and the strict parsers of the generators' outputs.

- `duet_messages`: DUET's single-pass profile prompt for a (user, item) pair (paper section 3.2-3.3, Figure 3):
  the user's history, the item's reviews by other users, both averages; the answer is, for the user and then for
  the item, a cue, a self-constructed prompt and a profile, in the tags of the DUET paper's code. `parse_duet` is its
  strict parser.
- `duet_profile_messages`: the DUET paper's "+Profile" ablation (Table 2): the same data, the answer only the user's
  and the item's profile, without cue and constructed prompt (`parse_duet_profile`).
- `kar_messages`, `palr_messages`, `rlmrec_messages`, `lg_messages`: the zero-shot user-profile prompts of the
  paper's appendix A.2 (written there for Yelp "businesses"; here the word is "item"). RLMRec answers in JSON
  (`parse_rlmrec`).
- `recommender_prompt`: the frozen recommender's rating prompt, with profiles (DUET, baselines, oracle) or
  without (10H: the ten most recent interactions only). The assistant turn is opened with an answer prefix that
  ends right before the rating digit (as Reason4Rec's "Predicted Rating: ").

Histories are lists of `data.history.HistoryEntry` (oldest first). Prompts are chat messages
[{"role", "content"}]; the caller renders them with the model's chat template.
"""
from __future__ import annotations

import json
from typing import NamedTuple

PROFILE_METHODS = ("kar", "palr", "rlmrec", "lg", "duet", "duet-profile")  # methods whose profiles an LLM writes


# ---------------------------------------------------------------------------------------------------- histories
def _clean(s: str) -> str:
    return " ".join(str(s).split())  # one line: reviews may hold newlines and runs of spaces


def _fmt_avg(x) -> str:
    return "unknown" if x is None else f"{x:.1f}"  # DUET: averages with one decimal


def format_user_history(entries, with_reviews: bool = True) -> str:
    """One numbered line per interaction, oldest first: "1. "Title" - rated 5/5 - review"."""
    if not entries:
        return "(no earlier interactions)"
    lines = []
    for n, e in enumerate(entries, 1):
        s = f'{n}. "{_clean(e.title) or e.item_id}" - rated {e.rating}/5'
        if with_reviews and e.review:
            s += f" - {_clean(e.review)}"
        lines.append(s)
    return "\n".join(lines)


def format_item_history(entries) -> str:
    """Other users' ratings and reviews of one item, oldest first."""
    if not entries:
        return "(no earlier reviews)"
    return "\n".join(f"{n}. rated {e.rating}/5 - {_clean(e.review)}" for n, e in enumerate(entries, 1))


def _user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


# ---------------------------------------------------------------------------------------------------- DUET
DUET_TAGS = ("cue", "constructed_prompt", "profile")
DUET_STOP = "</item_profile>"  # generation stops here: the parser fails any text after it

# the one-shot example's two profiles, shared by the DUET and the +Profile example
_EXAMPLE_USER_PROFILE = ("A user who values strategic thinking and nostalgic aesthetics; rates classic puzzle titles "
                         "5 and gives low ratings to fast action games.")
_EXAMPLE_ITEM_PROFILE = ("Light trail shoes praised for comfort; runners on a budget rate them highly, heavy hikers "
                         "do not.")
_DUET_EXAMPLE = (
    "<user_profile><cue>prefers retro puzzle games</cue>"
    "<constructed_prompt>Describe the user's taste in challenge and nostalgia, and how generously they rate."
    "</constructed_prompt>"
    f"<profile>{_EXAMPLE_USER_PROFILE}</profile></user_profile>\n"
    "<item_profile><cue>lightweight trail-running shoes</cue>"
    "<constructed_prompt>Describe the item's main features and which users like or dislike it.</constructed_prompt>"
    f"<profile>{_EXAMPLE_ITEM_PROFILE}</profile></item_profile>")
_DUET_PROFILE_EXAMPLE = (f"<user_profile>{_EXAMPLE_USER_PROFILE}</user_profile>\n"
                         f"<item_profile>{_EXAMPLE_ITEM_PROFILE}</item_profile>")


def _pair_data(user_hist, item_hist, user_avg, item_avg, item_title: str, with_reviews: bool) -> str:
    """The data of a (user, item) pair as the DUET prompts show it: the user's history and average, the item's
    reviews by other users and its average."""
    return (f"USER HISTORY (oldest first):\n{format_user_history(user_hist, with_reviews)}\n"
            f"User average rating: {_fmt_avg(user_avg)}\n\n"
            f'ITEM: "{_clean(item_title)}"\n'
            f"REVIEWS OF THE ITEM BY OTHER USERS (oldest first):\n{format_item_history(item_hist)}\n"
            f"Item average rating: {_fmt_avg(item_avg)}\n\n")


def duet_messages(user_hist, item_hist, user_avg, item_avg, item_title: str, with_reviews: bool = True):
    """DUET's one-pass prompt (paper 3.2 cue extraction + 3.3 self-prompt construction, Figure 3), shortened for
    small models and closed by a one-shot example of the output format (the DUET tags)."""
    return _user(
        "From the data below, write a profile of the USER and a profile of the ITEM for a rating predictor.\n"
        "For each: a cue (one short phrase capturing the main tendency, no full sentence), a constructed prompt "
        "(one instruction saying what the profile should describe), then the profile (1-3 sentences following "
        "that instruction).\n\n"
        f"{_pair_data(user_hist, item_hist, user_avg, item_avg, item_title, with_reviews)}"
        "Answer with exactly these tags and nothing else. Example of the format:\n"
        f"{_DUET_EXAMPLE}")


def duet_profile_messages(user_hist, item_hist, user_avg, item_avg, item_title: str, with_reviews: bool = True):
    """The DUET paper's "+Profile" ablation (Table 2): the data of duet_messages, the answer the two profiles
    alone, with no cue and no constructed prompt, closed by a one-shot example of that format."""
    return _user(
        "From the data below, write a profile of the USER and a profile of the ITEM for a rating predictor.\n"
        "Each profile is 1-3 sentences.\n\n"
        f"{_pair_data(user_hist, item_hist, user_avg, item_avg, item_title, with_reviews)}"
        "Answer with exactly these tags and nothing else. Example of the format:\n"
        f"{_DUET_PROFILE_EXAMPLE}")


PAIR_PROMPTS = {"duet": duet_messages, "duet-profile": duet_profile_messages}  # a user and an item profile per pair


class ParsedProfiles(NamedTuple):
    user_cue: str
    user_prompt: str
    user_profile: str
    item_cue: str
    item_prompt: str
    item_profile: str


class FormatError(ValueError):
    pass


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _block(text: str, pos: int, tag: str, where: str) -> tuple[str, int]:
    """Read `<tag>content</tag>` starting at `pos` (after whitespace) -> (content, position after the block)."""
    pos = _skip_ws(text, pos)
    open_, close = f"<{tag}>", f"</{tag}>"
    if not text.startswith(open_, pos):
        found = text[pos:pos + 30].replace("\n", " ") or "end of text"
        raise FormatError(f"missing <{tag}> {where}".rstrip() + f" (found {found!r})")
    start = pos + len(open_)
    end = text.find(close, start)
    if end < 0:
        raise FormatError(f"unclosed <{tag}> {where}".rstrip())
    return text[start:end], end + len(close)


_ALL_TAGS = ("user_profile", "item_profile") + DUET_TAGS


def _leaf(text: str, pos: int, tag: str, where: str) -> tuple[str, int]:
    content, pos = _block(text, pos, tag, where)
    for t in _ALL_TAGS:
        if f"<{t}>" in content or f"</{t}>" in content:
            raise FormatError(f"unclosed <{tag}> {where}".rstrip() + f" (a <{t}> tag inside it)")
    return content.strip(), pos


def _side(text: str, pos: int, side: str) -> tuple[tuple[str, str, str], int]:
    body, end = _block(text, pos, side, "")
    where = f"in <{side}>"
    vals, p = [], 0
    for tag in DUET_TAGS:
        v, p = _leaf(body, p, tag, where)
        vals.append(v)
    if body[p:].strip():
        raise FormatError(f"unexpected text {body[p:].strip()[:30]!r} after </profile> {where}")
    if not vals[2]:
        raise FormatError(f"empty profile {where}")
    return tuple(vals), end


def cut_after(text: str, stop_texts) -> str:
    """The text up to the end of its first stop text (the last token of a stopped row can carry characters past
    it, e.g. ">\n" or "></"); unchanged when it holds none."""
    ends = [text.index(s) + len(s) for s in stop_texts if s in text]
    return text[:min(ends)] if ends else text


def parse_duet(text: str) -> tuple[ParsedProfiles | None, str]:
    """Strict parse of a DUET answer -> (ParsedProfiles, "ok") or (None, reason).

    Accepted: `<user_profile><cue>..</cue><constructed_prompt>..</constructed_prompt><profile>..</profile>
    </user_profile>` then the same under `<item_profile>`, with any whitespace between tags and around contents.
    Rejected (format failure, reward -1 in GRPO): text before the first tag, a missing or unclosed tag, a tag
    inside a field, stray text between tags, an empty profile, any text after </item_profile>."""
    try:
        u, pos = _side(text, 0, "user_profile")
        i, pos = _side(text, pos, "item_profile")
        rest = text[pos:].strip()
        if rest:
            raise FormatError(f"trailing text after </item_profile>: {rest[:30]!r}")
    except FormatError as e:
        return None, str(e)
    return ParsedProfiles(*u, *i), "ok"


def parse_duet_profile(text: str) -> tuple[tuple[str, str] | None, str]:
    """Strict parse of a "+Profile" answer -> ((user_profile, item_profile), "ok") or (None, reason).

    Accepted: `<user_profile>..</user_profile>` then `<item_profile>..</item_profile>`, with any whitespace between
    the tags and around the contents. Rejected: text before the first tag, a missing or unclosed tag, a tag inside
    a profile (the DUET fields included), an empty profile, any text after </item_profile>."""
    try:
        profiles, pos = [], 0
        for side in ("user_profile", "item_profile"):
            v, pos = _leaf(text, pos, side, "")
            if not v:
                raise FormatError(f"empty {side}")
            profiles.append(v)
        rest = text[pos:].strip()
        if rest:
            raise FormatError(f"trailing text after </item_profile>: {rest[:30]!r}")
    except FormatError as e:
        return None, str(e)
    return tuple(profiles), "ok"


# ---------------------------------------------------------------------------------------------------- baselines
def kar_messages(user_hist, with_reviews: bool = True):
    """KAR (Xi et al. 2024), paper appendix A.2: free-text analysis of the user's preferences."""
    return _user(
        "Task: Analyze user preferences based on item reviewing history.\n"
        f"Input: the user's item reviewing history with sentiments over time (oldest first):\n"
        f"{format_user_history(user_hist, with_reviews)}\n\n"
        "Instructions:\n"
        "1. Analyze the user's preferences considering item names and categories.\n"
        "2. Take into account sentiment patterns over time.\n"
        "3. Provide clear explanations based on reviewing history details.\n"
        "4. Consider other pertinent factors that may influence preferences.")


def palr_messages(user_hist, with_reviews: bool = True):
    """PALR (Yang et al. 2023), paper appendix A.2: preference keywords ranked by importance, each with items."""
    return _user(
        "Task: Summarize user preferences using keywords.\n"
        f"Input: history items with user sentiments (oldest first):\n{format_user_history(user_hist, with_reviews)}\n\n"
        "Output format: an itemized list ordered by importance, following this template:\n"
        '{1.KEY_WORD_1:"HISTORY_ITEM_1","HISTORY_ITEM_2"; 2.KEY_WORD_2:"HISTORY_ITEM_3"}\n\n'
        "Instructions:\n"
        "1. Extract key preference indicators from the user interaction history.\n"
        "2. Rank keywords by importance.\n"
        "3. Associate relevant items with each keyword.")


def rlmrec_messages(user_hist, with_reviews: bool = True):
    """RLMRec (Ren et al. 2024), paper appendix A.2: JSON {"summarization", "reasoning"} only."""
    return _user(
        "Role: item recommendation assistant.\n"
        "Task: Determine the types of items this user is likely to enjoy.\n"
        "Input format: each line gives the item title, the user's rating and review (the user's sentiment).\n"
        "Output requirements:\n"
        "1. JSON format only.\n"
        '2. Structure: {"summarization": "types of items the user likely enjoys (at most 100 words)", '
        '"reasoning": "brief explanation for the summarization"}\n'
        "3. No additional text outside the JSON.\n\n"
        f"INTERACTION ITEMS:\n{format_user_history(user_hist, with_reviews)}")


def lg_messages(user_hist, with_reviews: bool = True, request: str = ""):
    """LettinGo (Wang et al. 2025), paper appendix A.2: the profile that best predicts the user's sentiment."""
    return _user(
        "You will serve as an assistant to help me generate a user profile based on this user's sentiment history "
        "to better understand this user's interest and thus predict his/her sentiment about a target item. I will "
        "provide you with some behavior history of the user in this format: [item attributes and sentiment]. The "
        "user profile you generate should contain as much useful content as possible to help predict the user's "
        "sentiment towards a new item.\n\n"
        f"USER HISTORY:\n{format_user_history(user_hist, with_reviews)}\n\n{request}PROFILE YOU GENERATE:")


def lg_rating_messages(user_hist, with_reviews: bool = True):
    """An exploration style for LettinGo (ours, not a paper baseline): LettinGo's prompt, and an answer that opens
    with the rating the user usually gives (RESPONSE_PREFIXES: the explorer writes the digit; SmolLM2-135M ignores
    the request alone). Exploring several prompt styles is part of LettinGo; this one makes candidates differ in
    a fact a small recommender can use (results/README.md: a profile stating the user's usual rating moves
    SmolLM2-135M's prediction, a description of taste does not), so the recommender's feedback has something to
    choose between. DPO then trains the plain "lg" prompt on the chosen profiles, prefix included."""
    return lg_messages(user_hist, with_reviews, request='Begin with the rating this user usually gives ("Usually '
                       'rates N/5."), then describe what the user likes and dislikes.\n\n')


BASELINE_PROMPTS = {"kar": kar_messages, "palr": palr_messages, "rlmrec": rlmrec_messages, "lg": lg_messages}
PROFILE_PROMPTS = {**BASELINE_PROMPTS, "lg-rating": lg_rating_messages}  # baselines + exploration-only styles
RESPONSE_PREFIXES = {"lg-rating": "Usually rates "}  # opens the answer; part of the profile text


def _strip_fence(text: str) -> str:
    t = text.strip()
    if t.startswith("```"):  # ```json ... ``` is still "JSON only"
        t = t.split("\n", 1)[1] if "\n" in t else ""
        if t.rstrip().endswith("```"):
            t = t.rstrip()[:-3]
    return t.strip()


def parse_rlmrec(text: str) -> tuple[str | None, str]:
    """RLMRec's JSON answer -> (profile text "summarization (reasoning: ...)", "ok") or (None, reason)."""
    t = _strip_fence(text)
    try:
        d = json.loads(t)
    except ValueError as e:
        return None, f"not valid JSON ({e.msg} at char {e.pos})"
    if not isinstance(d, dict):
        return None, "JSON is not an object"
    s = d.get("summarization")
    if not isinstance(s, str) or not s.strip():
        return None, 'missing or empty "summarization"'
    r = d.get("reasoning")
    return (s.strip() + (f" (Reasoning: {r.strip()})" if isinstance(r, str) and r.strip() else "")), "ok"


def parse_free_text(text: str) -> tuple[str | None, str]:
    """KAR, PALR, LG: the whole answer is the profile; only an empty answer is a failure."""
    t = text.strip()
    return (t, "ok") if t else (None, "empty answer")


PARSERS = {"kar": parse_free_text, "palr": parse_free_text, "lg": parse_free_text, "rlmrec": parse_rlmrec,
           "lg-rating": parse_free_text}


# ---------------------------------------------------------------------------------------------------- recommender
def recommender_prompt(history, item_title: str, user_profile: str | None = None,
                       item_profile: str | None = None, with_reviews: bool = False) -> tuple[list[dict], str]:
    """The frozen recommender's prompt (paper 4.1.2: recent history + user profile + item profile -> rating)
    -> (chat messages, assistant answer prefix). The caller renders the messages with the assistant turn opened
    and appends the prefix; the next token is the rating digit.

    The rating is asked as the continuation of the user's own rating list: the assistant turn opens with
    `N+1. "Target title" - rated `, so the digit follows the same pattern as the N history lines (small models
    copy such patterns far better than they follow an instruction; tried with SmolLM2-135M, results/README.md).
    The profiles open the assistant turn, in parentheses, right before that line: placed in the user message
    (first or last), SmolLM2-135M ignored them entirely (a profile "rates every album 1/5" moved no prediction),
    while here a profile that states a rating moves the digit (results/README.md). Without profiles (10H) it is
    the ten most recent interactions only, and the prompt is the same as before that change."""
    parts = ["Predict how this user rates the target item, from 1 to 5."]
    parts.append(f"THE USER'S MOST RECENT RATINGS (oldest first):\n{format_user_history(history, with_reviews)}")
    parts.append(f'TARGET ITEM: "{_clean(item_title)}"\n'
                 "Continue the list with the target item and the user's rating of it.")
    notes = ([f"(User profile: {_clean(user_profile)})\n"] if user_profile is not None else []) + \
        ([f"(Target item profile: {_clean(item_profile)})\n"] if item_profile is not None else [])
    prefix = "".join(notes) + f'{len(history) + 1}. "{_clean(item_title)}" - rated '
    return _user("\n\n".join(parts)), prefix
