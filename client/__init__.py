"""lcmserve client SDK."""
