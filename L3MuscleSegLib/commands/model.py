"""`l3muscleseg model ...`: install, list, inspect, verify, export and remove trained models."""

from __future__ import annotations

import argparse

from .. import models

NAME = "model"
HELP = "Manage the per-user store of trained nnU-Net models (install, list, verify, ...)."

EXIT_OK, EXIT_FAILED = 0, 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    store_help = (f"model store folder (default: ${models.STORE_ENV} if set, else "
                  f"{models.DEFAULT_STORE})")
    parser.add_argument("--store", metavar="DIR", help=store_help)
    # Also accepted after the action; SUPPRESS keeps a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", metavar="DIR", default=argparse.SUPPRESS, help=store_help)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    install = actions.add_parser(
        "install", parents=[common], help="install a trained results folder or export zip")
    source = install.add_mutually_exclusive_group(required=True)
    source.add_argument("source", nargs="?", metavar="FOLDER_OR_ZIP",
                        help="nnU-Net results folder (with plans.json, dataset.json, "
                             "fold_k/checkpoint_final.pth) or nnUNetv2_export_model_to_zip zip")
    source.add_argument("--demo", action="store_true",
                        help=f"install the demo model shipped with l3muscleseg (named "
                             f"'{models.DEMO_MODEL_NAME}')")
    install.add_argument("--name", help="store name (default: model card name, else dataset "
                                        "name)")
    install.add_argument("--version", help=f"store version (default: model card version, else "
                                           f"{models.DEFAULT_VERSION})")
    install.add_argument("--force", action="store_true", help="replace an installed version")

    actions.add_parser("list", parents=[common], help="list installed models")

    info = actions.add_parser("info", parents=[common], help="show a model's manifest")
    _add_name_version(info)

    remove = actions.add_parser("remove", parents=[common],
                                help="delete a version, or every version of a model")
    _add_name_version(remove)

    export = actions.add_parser("export", parents=[common],
                                help="write a model as a zip that `model install` accepts")
    _add_name_version(export)
    export.add_argument("zip", metavar="ZIP", help="zip file to write")
    export.add_argument("--overwrite", action="store_true", help="replace an existing ZIP")

    verify = actions.add_parser("verify", parents=[common],
                                help="re-check checksums (all models, or NAME)")
    verify.add_argument("name", nargs="?", metavar="NAME")
    verify.add_argument("--version")


def _add_name_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME")
    parser.add_argument("--version", help="default: the latest installed version")


def run(args: argparse.Namespace) -> int:
    return _ACTIONS[args.action](args)


def _install(args: argparse.Namespace) -> int:
    if args.demo:
        model = models.install_demo_model(name=args.name, force=args.force, root=args.store)
    else:
        model = models.install_model(args.source, name=args.name, version=args.version,
                                     force=args.force, root=args.store)
    print(f"installed {model.ref} (folds {_folds(model.folds)}"
          f"{f'; {model.label}' if model.label else ''}) into {model.path}")
    return EXIT_OK


def _list(args: argparse.Namespace) -> int:
    installed = models.list_models(args.store)
    if not installed:
        print(f"no models installed in {models.store_root(args.store)}")
        return EXIT_OK
    rows = [("NAME", "VERSION", "FOLDS", "LABEL", "PATH")] + [
        (m.name, m.version, _folds(m.folds), m.label or "-", str(m.path)) for m in installed]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(row[i].ljust(widths[i]) for i in range(4)) + "  " + row[4])
    return EXIT_OK


def _info(args: argparse.Namespace) -> int:
    model = models.find_model(args.name, args.version, args.store)
    manifest = model.manifest
    labels = ", ".join(f"{nid} {name} → class {manifest.label_mapping[nid]}"
                       for nid, name in manifest.label_names.items())
    for key, value in (
        ("model", model.ref), ("path", model.path), ("label", manifest.label or "-"),
        ("dataset", manifest.dataset_name), ("nnU-Net model", manifest.nnunet_folder),
        ("folds", _folds(manifest.folds)), ("labels", labels),
        ("training cases", manifest.num_training if manifest.num_training is not None else "?"),
        ("trained", manifest.trained_at or "?"), ("installed", manifest.installed_at),
        ("source", manifest.source), ("nnunetv2", manifest.nnunetv2_version),
        ("l3muscleseg", manifest.l3muscleseg_version),
    ):
        print(f"{key + ':':16}{value}")
    print("files:")
    for entry in manifest.files:
        print(f"  {entry.sha256}  {entry.size:>12}  {entry.path}")
    return EXIT_OK


def _remove(args: argparse.Namespace) -> int:
    for folder in models.remove_model(args.name, args.version, args.store):
        print(f"removed {folder.parent.name}:{folder.name}")
    return EXIT_OK


def _export(args: argparse.Namespace) -> int:
    path = models.export_model(args.name, args.zip, version=args.version,
                               overwrite=args.overwrite, root=args.store)
    print(f"exported {args.name}{f':{args.version}' if args.version else ''} to {path}")
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    reports = models.verify_models(args.name, args.version, args.store)
    if not reports:
        print(f"no models installed in {models.store_root(args.store)}")
    for report in reports:
        ref = f"{report.name}:{report.version}"
        if report.ok:
            print(f"ok       {ref}")
            continue
        print(f"CORRUPT  {ref} ({report.path})")
        for line in models.problem_lines(report):
            print(f"  {line}")
        print(f"  fix: reinstall it: l3muscleseg model install {report.source or 'SOURCE'} "
              f"--name {report.name} --version {report.version} --force")
    return EXIT_OK if all(r.ok for r in reports) else EXIT_FAILED


def _folds(folds: tuple) -> str:
    return ",".join(str(f) for f in folds)


_ACTIONS = {"install": _install, "list": _list, "info": _info, "remove": _remove,
            "export": _export, "verify": _verify}
