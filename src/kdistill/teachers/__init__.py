"""Teacher wrappers: local models, API teachers (``api``), the response store (``store``), the server (``serve``)."""
