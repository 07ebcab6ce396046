"""Prompts and strict parsers (data/prompts.py): what is accepted, what is rejected and why."""
import json

import pytest

from data.history import HistoryEntry
from data.prompts import (BASELINE_PROMPTS, ParsedProfiles, duet_messages, duet_profile_messages,
                          format_user_history, parse_duet, parse_duet_profile, parse_free_text, parse_rlmrec,
                          recommender_prompt)

GOOD = ("<user_profile><cue>likes jazz</cue><constructed_prompt>Describe genres.</constructed_prompt>"
        "<profile>A jazz fan.</profile></user_profile>"
        "<item_profile><cue>calm album</cue><constructed_prompt>Describe mood.</constructed_prompt>"
        "<profile>A calm jazz record.</profile></item_profile>")
WANT = ParsedProfiles("likes jazz", "Describe genres.", "A jazz fan.", "calm album", "Describe mood.",
                      "A calm jazz record.")


def test_parse_duet_well_formed():
    assert parse_duet(GOOD) == (WANT, "ok")


def test_parse_duet_whitespace_variations():
    spaced = ("\n  <user_profile>\n  <cue> likes jazz </cue>\n\t<constructed_prompt>\nDescribe genres.\n"
              "</constructed_prompt>\n  <profile>  A jazz fan.  </profile>\n</user_profile>\n\n"
              "<item_profile><cue>calm album</cue> <constructed_prompt>Describe mood.</constructed_prompt>"
              "<profile>\nA calm jazz record.\n</profile></item_profile>\n  \n")
    assert parse_duet(spaced) == (WANT, "ok")
    # inner whitespace and newlines inside a profile are the profile's own text
    p, why = parse_duet(GOOD.replace("A jazz fan.", "A jazz\nfan."))
    assert why == "ok" and p.user_profile == "A jazz\nfan."


@pytest.mark.parametrize("text, reason", [
    (GOOD.replace("<cue>likes jazz</cue>", ""), "missing <cue> in <user_profile>"),
    (GOOD.replace("</user_profile>", ""), "unclosed <user_profile>"),
    (GOOD.replace("<profile>A calm jazz record.</profile>", ""), "missing <profile> in <item_profile>"),
    (GOOD.replace("</cue>", "", 1), "unclosed <cue> in <user_profile>"),
    (GOOD.replace("</profile></item_profile>", "</item_profile>"), "unclosed <profile> in <item_profile>"),
    (GOOD.split("<item_profile>")[0], "missing <item_profile>"),
    (GOOD.replace("A jazz fan.", "  \n "), "empty profile in <user_profile>"),
    (GOOD + " Hope this helps!", "trailing text after </item_profile>"),
    ("Sure! " + GOOD, "missing <user_profile>"),
    (GOOD.replace("</constructed_prompt>", "</constructed_prompt> oops", 1),
     "missing <profile> in <user_profile> (found 'oops<profile>A jazz fan.</'"),
    (GOOD.replace("</profile></user_profile>", "</profile> extra</user_profile>"),
     "unexpected text 'extra' after </profile> in <user_profile>"),
    ("", "missing <user_profile>"),
])
def test_parse_duet_rejects_with_reason(text, reason):
    parsed, why = parse_duet(text)
    assert parsed is None
    assert why.startswith(reason.split(" (")[0]), why


PLAIN = "<user_profile>A jazz fan.</user_profile>\n<item_profile>A calm jazz record.</item_profile>"


def test_parse_duet_profile_well_formed():
    assert parse_duet_profile(PLAIN) == (("A jazz fan.", "A calm jazz record."), "ok")
    spaced = "\n <user_profile>\n A jazz\nfan. </user_profile>\n\n<item_profile> A calm jazz record.</item_profile>\n "
    assert parse_duet_profile(spaced) == (("A jazz\nfan.", "A calm jazz record."), "ok")


@pytest.mark.parametrize("text, reason", [
    (PLAIN.split("\n")[0], "missing <item_profile> (found 'end of text')"),
    (PLAIN.split("\n")[1], "missing <user_profile> (found '<item_profile>A calm jazz reco')"),
    (PLAIN.replace("</item_profile>", ""), "unclosed <item_profile>"),
    (PLAIN.replace("</user_profile>", ""), "unclosed <user_profile>"),
    (PLAIN + " Hope this helps!", "trailing text after </item_profile>: 'Hope this helps!'"),
    (PLAIN + "\n<item_profile>x</item_profile>",
     "trailing text after </item_profile>: '<item_profile>x</item_profile>'"),  # one pair, not two
    ("Sure! " + PLAIN, "missing <user_profile> (found 'Sure! <user_profile>A jazz fan')"),
    (PLAIN.replace("A jazz fan.", " \n"), "empty user_profile"),
    (PLAIN.replace("A calm jazz record.", ""), "empty item_profile"),
    (GOOD, "unclosed <user_profile> (a <cue> tag inside it)"),  # the DUET fields are not this format
    ("", "missing <user_profile> (found 'end of text')"),
])
def test_parse_duet_profile_rejects_with_reason(text, reason):
    assert parse_duet_profile(text) == (None, reason)


def test_parse_rlmrec():
    ok = json.dumps({"summarization": "Calm jazz.", "reasoning": "Rated jazz 5."})
    assert parse_rlmrec(ok) == ("Calm jazz. (Reasoning: Rated jazz 5.)", "ok")
    assert parse_rlmrec("```json\n" + ok + "\n```")[1] == "ok"
    assert parse_rlmrec('{"summarization": "x"}') == ("x", "ok")
    assert parse_rlmrec("The user likes jazz.")[0] is None
    assert parse_rlmrec(ok + " thanks")[1].startswith("not valid JSON")
    assert parse_rlmrec('{"reasoning": "r"}') == (None, 'missing or empty "summarization"')
    assert parse_rlmrec("[1, 2]") == (None, "JSON is not an object")
    assert parse_free_text("  \n") == (None, "empty answer")
    assert parse_free_text(" likes jazz ") == ("likes jazz", "ok")


H = [HistoryEntry("a", "Blue Train", 5, "Great\nsax  playing", 10), HistoryEntry("b", "Kind of Blue", 2, "meh", 20)]


def test_history_and_prompt_contents():
    s = format_user_history(H)
    assert s == '1. "Blue Train" - rated 5/5 - Great sax playing\n2. "Kind of Blue" - rated 2/5 - meh'
    assert format_user_history(H, with_reviews=False) == '1. "Blue Train" - rated 5/5\n2. "Kind of Blue" - rated 2/5'
    [m] = duet_messages(H, [HistoryEntry("x", "T", 4, "nice", 5, "u2")], 3.46, None, "Giant Steps")
    assert m["role"] == "user"
    for needle in ("Blue Train", "User average rating: 3.5", "Item average rating: unknown", "Giant Steps",
                   "1. rated 4/5 - nice", "<constructed_prompt>"):
        assert needle in m["content"], needle
    # +Profile: the same data sections, only the two profile tags asked for, in its one-shot example too
    [p] = duet_profile_messages(H, [HistoryEntry("x", "T", 4, "nice", 5, "u2")], 3.46, None, "Giant Steps")
    data = m["content"][m["content"].index("USER HISTORY"):m["content"].index("Answer with")]
    assert data in p["content"] and "Each profile is 1-3 sentences." in p["content"]
    assert "<cue>" not in p["content"] and "<constructed_prompt>" not in p["content"]
    example = p["content"].split("Example of the format:\n")[1]
    assert parse_duet_profile(example)[1] == "ok"
    assert parse_duet_profile(example)[0] == parse_duet(m["content"].split("Example of the format:\n")[1])[0][2::3]
    for name, fn in BASELINE_PROMPTS.items():
        assert "Kind of Blue" in fn(H)[0]["content"], name
    assert "JSON" in BASELINE_PROMPTS["rlmrec"](H)[0]["content"]


def test_recommender_prompt_with_and_without_profiles():
    [m], prefix = recommender_prompt(H, "Giant Steps")
    assert prefix == '3. "Giant Steps" - rated '  # continues the two-line history; the digit comes next
    plain = m["content"]
    assert "PROFILE" not in plain and "Giant Steps" in plain and "Kind of Blue" in plain
    [full], pre = recommender_prompt(H, "Giant Steps", "Loves  sax.\n", "Hard bop classic.")
    assert full == m  # the user message is the 10H one; the profiles open the answer, right before the digit
    assert pre == '(User profile: Loves sax.)\n(Target item profile: Hard bop classic.)\n3. "Giant Steps" - rated '
    only_user = recommender_prompt(H, "Giant Steps", "Loves sax.")[1]
    assert only_user == '(User profile: Loves sax.)\n3. "Giant Steps" - rated '
