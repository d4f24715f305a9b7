"""The bundle format 1.0: manifest, atomic writer, reader, archive, signing and verification."""
