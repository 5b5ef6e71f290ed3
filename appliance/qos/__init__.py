"""Network evaluation: traffic and network models, a discrete-event simulator, real
measurement between gateways, and reports that compare the two (MISSION.md, QoS part)."""
