"""The daemon's query room: cached posterior ensembles and the HTTP API answering from them."""
