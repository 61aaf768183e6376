"""batpak-mp's supervisor (import name ``batpak_supervisor``, so it installs beside
Supervisor/supervisord, whose import name is ``supervisor``).

Owns: starting the writer process, watching it, and restarting it under exactly two
restart policies, ``Once`` and ``Bounded(max_restarts, within_ms)``. The library
(``batpak_mp``) never imports this package; it starts it as a process.
"""
