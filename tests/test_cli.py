"""The command line: flags are never abbreviated (a mistyped flag is an error, not another flag)."""
from __future__ import annotations

import pytest

from ue_dist.cli import build_parser


@pytest.mark.parametrize("argv, unknown", [
    (["fit", "--method", "em", "--train", "0.5", "TRAIN", "STATE"], "--train"),
    (["protect", "--meth", "em", "SRC", "DST"], "--meth"),
    (["evaluate", "--train", "T", "--test", "U", "--adv", "2/255"], "--adv"),
])
def test_abbreviated_flags_are_refused(argv, unknown, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2
    assert unknown in capsys.readouterr().err


def test_full_flags_still_parse():
    args = build_parser().parse_args(["fit", "--method", "em", "--train-fraction", "0.5", "T", "S"])
    assert args.train_fraction == 0.5 and args.train == "T"
