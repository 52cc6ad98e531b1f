"""The files a fresh worker VM runs, rendered into its user-data by zfalkon.provision.

``zfalkon-boot.sh`` (first boot: install, then start the unit) and
``zfalkon-worker.service`` (the systemd unit, also baked into the image by ``ami/``).
Installed as the package ``zfalkon_bootstrap`` (see pyproject.toml) so that the renderer
finds them in an installed zfalkon too.
"""
