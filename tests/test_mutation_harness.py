"""`make mutation` leaves out mutants that change only a message's text (tests/mutation.py `message_mutants`): the
rule must not leave out a mutant that changes what the code computes."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import mutation  # noqa: E402

ORIGINAL = '''
def x_f__mutmut_orig(a):
    if a < 0:
        raise ValueError(f"bad {a}")
    log("step", a)
    assert a < 9, "too big"
    return a + 1, "kept"
'''
MUTANTS = {  # number -> (body, whether only a message changed)
    1: ('raise ValueError(f"bad {a}")', 'raise ValueError(f"XXbad XX{a}")', True),
    2: ('log("step", a)', 'log("XXstepXX", a)', True),
    3: ('assert a < 9, "too big"', 'assert a < 9, "XXtoo bigXX"', True),
    4: ('return a + 1, "kept"', 'return a + 1, "XXkeptXX"', False),  # a returned string is a value
    5: ("if a < 0:", "if a <= 0:", False),
    6: ("return a + 1", "return a - 1", False),
    7: ('log("step", a)', 'log("step", None)', False),
    8: ("assert a < 9", "assert a < 10", False),
}


def test_only_mutants_changing_a_message_text_are_left_out(tmp_path):
    text = ORIGINAL
    for n, (old, new, _) in MUTANTS.items():
        text += ORIGINAL.replace("x_f__mutmut_orig", f"x_f__mutmut_{n}").replace(old, new, 1)
    path = tmp_path / "m.py"
    path.write_text(text)
    assert mutation.message_mutants(path, "m") == {f"m.x_f__mutmut_{n}" for n, (*_, only) in MUTANTS.items() if only}
