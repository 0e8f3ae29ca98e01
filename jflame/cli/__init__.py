"""absl command-line programs: flags live here and nowhere else in jflame."""
