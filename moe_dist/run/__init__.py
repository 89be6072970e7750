"""Running a training job: the command line (``cli``), the loop (``trainer``), the optimizer and LR
schedule (``optim``), metrics, the console (``ui``), trackers, and the run folder's own files (``folder``,
``lock``, ``artifacts``), plus ``--init-from`` (``init_from``). ``moe_dist/train.py`` wires them together."""
