"""Planning memory before a run, analytically and without torch: ``memory`` (the per-consumer terms of one
layout), ``layout_search`` (``--choose`` / ``--fit``), ``report`` (the tables), ``cli`` (``moe-plan``),
``param_counts`` and ``muon_cost`` (what the terms are made of), ``units`` (sizes in and out)."""
