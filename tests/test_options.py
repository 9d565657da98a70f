"""Every option declared once (issue 40): the command line's flags and ``Clusterer``'s keyword
parameters come from one table of short names (``config.SHORT_OPTIONS``) and the methods' own
``Options`` fields declared as flags (``methods.option_flags``); each name sets a declared field. The
backbone names and the view fields have one source each. Nothing here trains."""

import dataclasses
import inspect
import typing

import pytest

from deepclust import api, cli, nets
from deepclust.api import Clusterer
from deepclust.config import (BACKBONE_NAMES, BACKBONES, FLAG_ONLY_OPTIONS, SHORT_OPTIONS, SWITCH_OPTIONS,
                              VIEW_FIELDS, VIEW_PRESET_NAMES, Config, ViewsConfig)
from deepclust.configure import build_config
from deepclust.errors import ConfigError
from deepclust.methods import METHODS, option_flags
from deepclust.views import VIEW_PRESETS, ViewSpec


def declared(dotted: str, options: type | None = None) -> bool:
    """Whether ``dotted`` names a declared option of the configuration: a field that is not a section
    and not marked ``not_an_option``; ``options.NAME`` a field of the method's ``options`` class."""
    cls: typing.Any = Config
    *sections, name = dotted.split(".")
    for section in sections:
        if cls is Config and section == "options":
            if options is None:
                return False
            cls = options
            continue
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if section not in fields:
            return False
        cls = typing.get_type_hints(cls)[section]
        if not dataclasses.is_dataclass(cls):
            return False
    fields = {f.name: f for f in dataclasses.fields(cls)}
    f = fields.get(name)
    return (f is not None and name != "options" and not f.metadata.get("not_an_option")
            and not dataclasses.is_dataclass(typing.get_type_hints(cls)[name]))


def test_the_check_refuses_a_key_that_names_no_declared_field():
    assert declared("optim.lr") and declared("out") and declared("cluster.n_clusters")
    for bad in ("optim.lrr", "optim", "optim.lr.x", "nope.lr", "resolution", "options", "options.rounds"):
        assert not declared(bad), bad
    assert declared("options.rounds", METHODS["and"].Options)


def test_every_short_name_sets_a_declared_field():
    bad = {name: key for name, key in SHORT_OPTIONS.items() if not declared(key)}
    assert not bad, f"short names whose key names no declared field: {bad}"
    assert len(set(SHORT_OPTIONS.values())) == len(SHORT_OPTIONS)  # one name per field
    assert set(SWITCH_OPTIONS) <= set(SHORT_OPTIONS) and set(FLAG_ONLY_OPTIONS) <= set(SHORT_OPTIONS)


def test_every_method_flag_is_a_declared_field_of_a_method():
    flags = option_flags()
    assert {"rounds", "neighbours", "curriculum"} <= set(flags)  # AND's
    for name, (key, text) in flags.items():
        assert key == f"options.{name}" and text
        owners = [m for m, cls in METHODS.items() if declared(key, cls.Options)
                  and any(f.name == name and f.metadata.get("flag") for f in dataclasses.fields(cls.Options))]
        assert owners, f"--{name}: no method's Options declares {name} as a flag"
    assert not set(flags) & set(SHORT_OPTIONS), "a method's flag shadows a shared short name"


def _fit_parser():
    return cli._parser().commands.choices["fit"]


def test_the_fit_flags_are_the_table():
    """Each value flag of ``deepclust fit`` (less --config and --set) is a FIT_FLAGS entry, spelled
    --NAME with dashes, and each entry has its flag; the switches set the table's other names."""
    actions = [a for a in _fit_parser()._actions if a.option_strings]
    values = {a.dest: a for a in actions if a.nargs is None and a.dest not in ("config", "set")}
    assert set(values) == set(cli.FIT_FLAGS)
    for name, action in values.items():
        assert action.option_strings == [f"--{name.replace('_', '-')}"], action.option_strings
        assert action.help, name
    assert cli.FIT_FLAGS == {**{n: k for n, k in SHORT_OPTIONS.items() if n not in SWITCH_OPTIONS},
                             **{n: k for n, (k, _) in option_flags().items()}}
    switches = {a.option_strings[0] for a in actions if a.nargs == 0}
    assert {"--download", "--no-progress"} <= switches and set(SWITCH_OPTIONS) == {"download", "progress"}
    assert set(cli.EVAL_FLAGS.items()) <= set(SHORT_OPTIONS.items())


def test_a_method_flag_reaches_its_option_with_its_help():
    args = _fit_parser().parse_args(["--method", "and", "--rounds", "2", "--neighbours", "3",
                                     "--curriculum", "one-off", "--download", "--no-progress"])
    layer = cli._layer_from_flags(args, cli.FIT_FLAGS)
    cfg = build_config(layer)
    assert (cfg.options.rounds, cfg.options.neighbours, cfg.options.curriculum) == (2, 3, "one-off")
    helps = {a.dest: a.help for a in _fit_parser()._actions}
    for name, (_, text) in option_flags().items():
        assert helps[name] == text
    assert helps["rounds"] == "AND: curriculum rounds R after round 0 (paper: 4)"


def test_clusterers_parameters_are_the_table():
    """scikit-learn's rule: explicit keyword parameters (no **kwargs), get_params from the signature;
    the signature is the command line's names (less --out), then config and settings."""
    signature = inspect.signature(Clusterer)
    params = list(signature.parameters)
    assert params == list(api.PARAMETERS)
    assert params[:2] == ["method", "n_clusters"] and params[-2:] == ["config", "settings"]
    names = [n for n in SHORT_OPTIONS if n not in FLAG_ONLY_OPTIONS] + list(option_flags())
    assert params[:-2] == names
    assert all(p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is None
               for p in signature.parameters.values())
    assert "get_params" not in vars(Clusterer)  # scikit-learn's, from the signature
    shadowing = [n for n in params if hasattr(Clusterer, n)]
    assert not shadowing, f"parameters named as Clusterer attributes: {shadowing}"
    assert set(Clusterer().get_params()) == set(params)


def test_the_backbone_names_have_one_source():
    assert nets.BACKBONES is BACKBONES and BACKBONE_NAMES == ("auto", *BACKBONES)


def test_the_view_fields_have_one_source():
    assert VIEW_FIELDS == tuple(f.name for f in dataclasses.fields(ViewsConfig) if f.name != "preset")
    assert set(VIEW_FIELDS) <= {f.name for f in dataclasses.fields(ViewSpec)}
    assert set(VIEW_PRESET_NAMES) - {"auto"} == set(VIEW_PRESETS)


def test_view_spec_takes_every_view_field():
    from deepclust.resolution import view_spec

    views = dataclasses.replace(ViewsConfig(), preset="digits", crop_scale=[0.5, 1.0], flip=True, rotation=3.0,
                                shift=0.05, rescale=[0.8, 1.2], color_jitter=0.1, grayscale_p=0.3)
    spec = view_spec(views)
    assert spec == dataclasses.replace(VIEW_PRESETS["digits"], crop_scale=(0.5, 1.0), flip=True, rotation=3.0,
                                       shift=0.05, rescale=(0.8, 1.2), color_jitter=0.1, grayscale_p=0.3)


def test_settings_set_any_option_by_its_dotted_name():
    est = Clusterer(method="pcp", epochs=2, settings={"optim.weight_decay": 1e-4, "options.gamma": 0.3,
                                                      "train.epochs": 3})
    cfg = est.configuration()
    assert (cfg.optim.weight_decay, cfg.options.gamma, cfg.train.epochs) == (1e-4, 0.3, 3)  # settings over names
    for bad, fragment in (({"optim.lrr": 1}, "unknown option optim.lrr"), ("optim.lr=1", "settings: expected"),
                          ({1: 2}, "settings: expected")):
        with pytest.raises(ConfigError, match=fragment):
            Clusterer(settings=bad)


def test_an_unknown_name_is_refused_and_nothing_changes():
    with pytest.raises(TypeError, match="no_such_option"):
        Clusterer(no_such_option=1)  # Python's own: the signature is explicit
    est = Clusterer(method="instance", epochs=2)
    before = est.get_params()
    for name in ("no_such_option", "optim__weight_decay", "predict"):
        with pytest.raises(ConfigError, match=f"unknown parameter '{name}'.*settings="):
            est.set_params(**{name: 1})
    assert est.get_params() == before
