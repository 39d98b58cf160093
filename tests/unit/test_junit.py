"""JUnit reports as real tools write them, and hostile XML."""

from __future__ import annotations

import pytest

from testhide.controlplane.jobs.junit import JunitError, parse_junit
from testhide.controlplane.jobs.model import TestStatus

PYTEST = b"""<?xml version="1.0" encoding="utf-8"?><testsuites>\
<testsuite name="pytest" errors="0" failures="1"
skipped="1" tests="3" time="0.05"><testcase classname="test_sample" name="test_ok" time="0.001" />
<testcase classname="test_sample" name="test_bad" time="0.002"><failure message="assert 1 == 2">\
def test_bad():
&gt;       assert 1 == 2</failure></testcase><testcase classname="test_sample" name="test_later" time="0.000">
<skipped type="pytest.skip" message="not yet">test_sample.py:9: not yet</skipped></testcase></testsuite>\
</testsuites>"""

SUREFIRE = b"""<?xml version="1.0" encoding="UTF-8"?>
<testsuite xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" name="com.example.AppTest" time="0.012"
tests="2" errors="1" skipped="0" failures="0"><properties><property name="java.version" value="17"/>\
</properties>
<testcase name="adds" classname="com.example.AppTest" time="0.001"/>
<testcase name="divides" classname="com.example.AppTest" time="0.002"><error message="/ by zero"
type="java.lang.ArithmeticException">java.lang.ArithmeticException: / by zero</error></testcase>\
</testsuite>"""

GO_JUNIT_REPORT = b"""<?xml version="1.0" encoding="UTF-8"?>
<testsuites tests="2" failures="1"><testsuite tests="2" failures="1" time="1.234" name="example.com/pkg"
timestamp="2024-01-01T00:00:00Z"><properties><property name="go.version" value="go1.22"></property>\
</properties>
<testcase classname="pkg" name="TestGood" time="0.000"></testcase>
<testcase classname="pkg" name="TestBad" time="1.230"><failure message="Failed" type="">\
bad_test.go:9: want 2, got 3
</failure></testcase></testsuite></testsuites>"""

XXE = b"""<?xml version="1.0"?><!DOCTYPE testsuite [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<testsuite name="x"><testcase name="&xxe;"/></testsuite>"""

BOMB = b"""<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">\
<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;"><!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">]>
<testsuite name="&lol4;"/>"""


def test_pytest_report() -> None:
    cases = parse_junit(PYTEST)
    assert [(c.name, c.status) for c in cases] == [
        ("test_ok", TestStatus.PASSED),
        ("test_bad", TestStatus.FAILED),
        ("test_later", TestStatus.SKIPPED),
    ]
    assert cases[1].message == "assert 1 == 2"
    assert cases[1].classname == "test_sample"
    assert cases[0].suite == "pytest"
    assert cases[1].duration_s == pytest.approx(0.002)


def test_surefire_report() -> None:
    cases = parse_junit(SUREFIRE)
    assert [(c.suite, c.classname, c.name, c.status) for c in cases] == [
        ("com.example.AppTest", "com.example.AppTest", "adds", TestStatus.PASSED),
        ("com.example.AppTest", "com.example.AppTest", "divides", TestStatus.ERROR),
    ]
    assert cases[1].message == "/ by zero"


def test_go_junit_report() -> None:
    cases = parse_junit(GO_JUNIT_REPORT)
    assert [(c.name, c.status) for c in cases] == [
        ("TestGood", TestStatus.PASSED),
        ("TestBad", TestStatus.FAILED),
    ]
    assert cases[1].duration_s == pytest.approx(1.23)


@pytest.mark.parametrize("hostile", [XXE, BOMB], ids=["xxe", "entity-bomb"])
def test_hostile_xml_is_refused_without_expansion(hostile: bytes) -> None:
    with pytest.raises(JunitError, match="DTDForbidden"):
        parse_junit(hostile)


@pytest.mark.parametrize("text", [b"<html/>", b"not xml at all", b""])
def test_non_reports_are_refused(text: bytes) -> None:
    with pytest.raises(JunitError):
        parse_junit(text)
