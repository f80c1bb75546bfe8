"""Tolerant ISMRMRD header parsing: what strict ismrmrd 1.15 rejects, we read; missing fields are named."""
import ismrmrd
import pytest

from gadget.data.mrd_header import HeaderError, build_header_xml, parse_encoding

NS = 'xmlns="http://www.ismrm.org/ISMRMRD"'
ENCODING = """<encoding>
  <encodedSpace><matrixSize><x>640</x><y>368</y><z>1</z></matrixSize>
    <fieldOfView_mm><x>280</x><y>140</y><z>4.5</z></fieldOfView_mm></encodedSpace>
  <reconSpace><matrixSize><x>320</x><y>320</y><z>1</z></matrixSize>
    <fieldOfView_mm><x>140</x><y>140</y><z>4.5</z></fieldOfView_mm></reconSpace>
  <encodingLimits><kspace_encoding_step_1><minimum>0</minimum><maximum>365</maximum><center>182</center>
  </kspace_encoding_step_1></encodingLimits>
  <trajectory>cartesian</trajectory>%s
</encoding>"""

CASES = {
    "version element and no experimentalConditions": f"<ismrmrdHeader {NS}><version>8</version>{ENCODING % ''}</ismrmrdHeader>",
    "unknown elements": f"<ismrmrdHeader {NS}><experimentalConditions><H1resonanceFrequency_Hz>1</H1resonanceFrequency_Hz>"
                        f"</experimentalConditions>{ENCODING % '<vendorMagic>42</vendorMagic>'}<myTag/></ismrmrdHeader>",
    "no namespace": f"<ismrmrdHeader>{ENCODING % ''}</ismrmrdHeader>",
    "trailing NULs": f"<ismrmrdHeader {NS}>{ENCODING % ''}</ismrmrdHeader>\x00\x00",
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_headers_strict_ismrmrd_rejects_still_parse(name):
    xml = CASES[name]
    with pytest.raises(Exception):
        ismrmrd.xsd.CreateFromDocument(xml.rstrip("\x00"))
    enc = parse_encoding(xml, source="scan.h5")
    assert enc.encoded_matrix == (640, 368, 1) and enc.recon_size == (320, 320)
    # fastMRI's padding rule: left = 368//2 - 182 = 2, right = 2 + 365 + 1
    assert enc.padding == (2, 368)


@pytest.mark.parametrize("remove,field", [
    ("<x>640</x>", "encodedSpace/matrixSize/x"),
    ("<matrixSize><x>320</x><y>320</y><z>1</z></matrixSize>", "reconSpace/matrixSize/x"),
])
def test_missing_field_is_named_with_the_source(remove, field):
    xml = CASES["no namespace"].replace(remove, "")
    with pytest.raises(HeaderError) as info:
        parse_encoding(xml, source="scan.h5")
    assert field in str(info.value) and "scan.h5" in str(info.value)


def test_not_a_number_and_not_xml():
    with pytest.raises(HeaderError, match="'encodedSpace/matrixSize/x' = 'abc'"):
        parse_encoding(CASES["no namespace"].replace("<x>640</x>", "<x>abc</x>"), "f.h5")
    with pytest.raises(HeaderError, match="not valid XML"):
        parse_encoding("<ismrmrdHeader><enc", "f.h5")
    with pytest.raises(HeaderError, match="empty"):
        parse_encoding("\x00", "f.h5")


def test_limits_default_when_absent():
    xml = CASES["no namespace"].replace(
        "<encodingLimits><kspace_encoding_step_1><minimum>0</minimum><maximum>365</maximum><center>182</center>\n"
        "  </kspace_encoding_step_1></encodingLimits>", "")
    enc = parse_encoding(xml)
    assert (enc.e1_min, enc.e1_max, enc.e1_center) == (0, 367, 184)


def test_built_header_is_strictly_valid():
    xml = build_header_xml(encoded_matrix=(64, 48, 1), recon_matrix=(32, 48, 1), encoded_fov_mm=(400, 300, 5),
                           recon_fov_mm=(200, 300, 5), e1_max=47, e1_center=24, num_coils=8, num_slices=3,
                           acceleration_e1=4, calibration_mode="embedded")
    hdr = ismrmrd.xsd.CreateFromDocument(xml)
    assert hdr.encoding[0].encodingLimits.slice.maximum == 2
    assert parse_encoding(xml).acceleration_e1 == 4
