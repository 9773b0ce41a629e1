"""Op rule families, one file each; importing a module registers its rules."""
