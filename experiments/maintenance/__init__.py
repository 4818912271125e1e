"""Tools for changing the repository safely: the behaviour fingerprint of a
refactor, the conversion of old result files into records."""
