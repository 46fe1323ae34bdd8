"""The node side: what the driver container does to the node it runs on.

Loading a verified tree (``driver_load``, its parameters ``module_params``, its failures explained
``load_diagnosis``), unloading (``unload``), the node's state (``state``: pid lock, readiness, state file,
driver root, the published tree), the daemons (``daemons``), a vGPU guest (``vgpu``), the userspace install
(``userspace``) and the fast path (``fast_path``). Nothing here imports a command.
"""
