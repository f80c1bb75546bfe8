"""Packaging for Siemens OpenRecon: the image label (:mod:`.label`, validated against
``schema.json``) and the PDF manual (:mod:`.manual`). The CLI (``varnet openrecon``) builds the
package from them; the server itself needs none of this."""
