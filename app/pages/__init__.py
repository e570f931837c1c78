"""Dash Pages of the explorer, one module per page; :mod:`app.server` registers them."""
