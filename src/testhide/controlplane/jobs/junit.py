"""JUnit XML as written by pytest, Maven Surefire and go-junit-report, parsed
with defusedxml: any DTD is refused, which rules out external entities and
entity-expansion bombs before anything is expanded."""

from __future__ import annotations

from xml.etree.ElementTree import Element

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import ParseError, fromstring

from testhide.controlplane.jobs.model import TestCase, TestStatus

MAX_REPORT_BYTES = 16 * 1024 * 1024
MAX_MESSAGE = 4096


class JunitError(ValueError):
    """A report that is not JUnit XML, or is hostile."""


def _float(value: str | None) -> float:
    try:
        return max(0.0, float((value or "0").replace(",", "")))
    except ValueError:
        return 0.0


def _case(suite: str, element: Element) -> TestCase:
    status, message = TestStatus.PASSED, ""
    for child, kind in (
        (element.find("failure"), TestStatus.FAILED),
        (element.find("error"), TestStatus.ERROR),
        (element.find("skipped"), TestStatus.SKIPPED),
    ):
        if child is not None:
            status = kind
            message = child.get("message") or (child.text or "").strip()
            break
    return TestCase(
        suite=suite,
        classname=element.get("classname", ""),
        name=element.get("name", ""),
        duration_s=_float(element.get("time")),
        status=status,
        message=message[:MAX_MESSAGE],
    )


def parse_junit(data: bytes) -> list[TestCase]:
    if len(data) > MAX_REPORT_BYTES:
        raise JunitError(f"report larger than {MAX_REPORT_BYTES} bytes")
    try:
        root = fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except (DefusedXmlException, ParseError) as exc:
        raise JunitError(f"refused: {exc.__class__.__name__}: {exc}") from exc
    if root.tag == "testsuite":
        suites = [root]
    elif root.tag == "testsuites":
        suites = list(root.iter("testsuite"))
    else:
        raise JunitError(f"not a JUnit report (root element <{root.tag}>)")
    cases: list[TestCase] = []
    for suite in suites:
        name = suite.get("name", "")
        cases.extend(_case(name, element) for element in suite.findall("testcase"))
    return cases
