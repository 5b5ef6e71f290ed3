"""The broker to the central PACS: replicas query and retrieve from it over their LAN and
serve it into the mesh; every other gateway reaches it through the replicas."""
