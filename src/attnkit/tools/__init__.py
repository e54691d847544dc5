"""attnkit.tools: timing, bench, check, peers and the command line. Nothing in attnkit imports tools."""
