from cxrloc.cli import main


def test_config_command(capsys):
    assert main(["config", "baseline", "--set", "train.max_epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "use_dl: false" in out and "max_epochs: 2" in out


def test_config_command_bad_key_is_one_line(capsys):
    assert main(["config", "dlrv", "--set", "loss.nope=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'loss.nope'" in err and "Traceback" not in err
