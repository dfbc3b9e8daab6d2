"""The HTML report's pieces: page, thumbnails, charts and sections (the stage itself is gatrep.stages.report)."""
