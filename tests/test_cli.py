from cxrloc.cli import main


def test_config_command(capsys):
    assert main(["config", "baseline", "--set", "train.max_epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "use_dl: false" in out and "max_epochs: 2" in out


def test_config_command_bad_key_is_one_line(capsys):
    assert main(["config", "dlrv", "--set", "loss.nope=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'loss.nope'" in err and "Traceback" not in err


def test_every_command_builds_its_parser():
    import pytest

    from cxrloc.cli import COMMANDS, build_parser

    for name in COMMANDS:
        parser = build_parser(name)
        with pytest.raises(SystemExit) as e:
            parser.parse_args([name, "--help"])
        assert e.value.code == 0


def test_atomic_files_get_normal_permissions(tmp_path):
    import os

    from cxrloc.fileio import atomic_write_text

    atomic_write_text(tmp_path / "a.txt", "x")
    mode = os.stat(tmp_path / "a.txt").st_mode & 0o777
    assert mode & 0o044, oct(mode)  # readable by group/others under the usual umask 022
