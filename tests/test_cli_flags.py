"""`cfsam train`'s flags come from the trainer's DEFAULTS: every option, with its type, and nothing else."""
from cfsam import cli
from cfsam.training import config


def _train_actions():
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    return {a.dest: a for a in sub.choices["train"]._actions}


def test_every_trainer_option_is_a_flag_of_its_type():
    actions = _train_actions()
    assert set(config.DEFAULTS) <= set(actions)
    extra = set(actions) - set(config.DEFAULTS)
    assert extra == {"help", "preset", "stage", "model", "dataset", "out", "rehearsal"}  # the spec's own, and --rehearsal
    for name, default in config.DEFAULTS.items():
        a = actions[name]
        assert a.option_strings == ["--" + name.replace("_", "-")] and a.help, name
        if isinstance(default, bool):
            assert a.const is True and a.default is None, name  # store_true, left out unless given
        else:
            assert a.type is config.TYPES.get(name, type(default)) and a.default is None, name
    assert tuple(actions["optimizer"].choices) == config.OPTIMIZERS and tuple(actions["dist"].choices) == config.DISTS


def test_flags_reach_the_spec_and_left_out_ones_keep_the_defaults():
    args = cli.build_parser().parse_args(["train", "--model", "tiny", "--dataset", "alpaca", "--group-by-length",
                                          "--snapshots", "4", "--n-train", "16", "--max-grad-norm", "0.5"])
    spec = cli.train_spec(args)
    assert {k: spec[k] for k in ("group_by_length", "snapshots", "n_train", "max_grad_norm")} == \
        {"group_by_length": True, "snapshots": 4, "n_train": 16, "max_grad_norm": 0.5}
    assert "lr" not in spec and config.resolve(spec)["lr"] == config.DEFAULTS["lr"]
