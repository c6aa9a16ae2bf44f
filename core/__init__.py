"""Ground floor: intake, data, artifacts, profiles, scoring. Imports nothing above it."""
