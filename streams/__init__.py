"""The stream side: records, agents, catalog and profile state."""
