# Jupyter server config for capsule dev containers (rendered by `capsule image render`).
# The token comes from a 0600 file the entrypoint writes (JUPYTER_TOKEN / JUPYTER_TOKEN_FILE or a
# random one): it never appears on a command line, in the environment of the server, or in logs
# (jupyter_server prints a token it did not generate as "...").
import os

c = get_config()  # noqa: F821  (provided by Jupyter when it loads this file)

_token_file = os.environ.get("CAPSULE_JUPYTER_TOKEN_FILE")
if _token_file and os.path.exists(_token_file):
    with open(_token_file) as f:
        c.IdentityProvider.token = f.read().strip()
# Only the token logs in: no password login, no changing it from the browser.
c.PasswordIdentityProvider.hashed_password = ""
c.PasswordIdentityProvider.allow_password_change = False
c.ServerApp.allow_root = False
c.ServerApp.open_browser = False
c.ServerApp.root_dir = "/workspace"
