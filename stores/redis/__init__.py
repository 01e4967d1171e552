"""Redis stores: one module per aggregate, one client (``client.new_client``)."""
