"""The data options ``peftlab train`` and ``peftlab bench`` share, and the task they name.

``--data FILE`` alone is the user's file (the task ``file``); ``--val-data`` and ``--test-data``
add split files; ``--task`` names a built-in task. :func:`data_task` builds the task and checks,
before any model is loaded or trained, that it has a test split to score the result on.
"""

from __future__ import annotations

import argparse
from typing import Any

from peftlab.core.errors import ConfigError
from peftlab.lab.tasks import FILE, DataFiles, get_task, task_names

__all__ = ["add_data_arguments", "data_files", "data_task"]


def add_data_arguments(group: Any, *, task_default: str | None = None) -> None:
    """The data options ``peftlab train`` and ``peftlab bench`` share: ``--task``, ``--data``,
    ``--val-data``, ``--test-data``, ``--encoding``."""
    default = f" (default: {task_default}, or the file task with --data)" if task_default else ""
    group.add_argument("--task", help=f"built-in task: {', '.join(task_names())}; --data FILE alone needs none"
                                      f"{default}")
    group.add_argument("--data", metavar="FILE", help="your own .csv or .jsonl: columns text,label (classification) "
                       "or prompt,response (causal LM), optionally split (train, validation/val/dev, test)")
    group.add_argument("--val-data", metavar="FILE", help="validation rows in their own file, same columns "
                       "(default: the split column's, else 10%% of the training rows, stratified)")
    group.add_argument("--test-data", metavar="FILE", help="test rows in their own file, same columns (needed "
                       "unless --data has a split column with test rows)")
    group.add_argument("--encoding", default="utf-8", help="text encoding of the data files (e.g. cp1252, latin-1)")


def data_task(args: argparse.Namespace, default: str | None = None) -> Any:
    """The task the data options name, with its test split checked before anything trains.

    ``--data`` without ``--task`` (or with ``--task file``) is the user's file; neither gives
    ``default`` (an error naming both options when there is none).

    Raises:
        ConfigError: Nothing named, a built-in task with a data file, a bad file, or no test split.
    """
    if args.data:
        name = None if args.task in (None, FILE) else args.task  # a built-in name with a file: get_task refuses
    elif args.val_data or args.test_data:
        raise ConfigError("--val-data and --test-data add splits to your own data; pass the training file with "
                          "--data FILE too")
    else:
        name = args.task or default
        if name is None:
            raise ConfigError(f"say what to train on: --task ({', '.join(task_names())}) or --data FILE")
    task = get_task(name, data_files(args), encoding=args.encoding)
    task.require_test()
    return task


def data_files(args: argparse.Namespace) -> str | DataFiles | None:
    """The ``data`` argument for :func:`peftlab.lab.tasks.get_task` (and ``BenchConfig``): the
    ``--data`` path, a :class:`~peftlab.lab.tasks.DataFiles` when split files come with it."""
    if not args.data:
        return None
    if args.val_data or args.test_data:
        return DataFiles(args.data, validation=args.val_data, test=args.test_data)
    return args.data
