"""The properties files that carry Spark conf, read back by Java's own ``java.util.Properties``
as spark-submit reads them (UTF-8): every value arrives exactly. Needs a JVM, so not in the fast
tier (tests/fast/test_hygiene.py checks the text the writer produces)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from studio.worker.properties import write_properties

READER = """
import java.io.*;
import java.nio.charset.StandardCharsets;
import java.util.*;

public class ReadProperties {
    static String hex(String text) {
        StringBuilder out = new StringBuilder();
        for (char c : text.toCharArray()) out.append(String.format("%04x", (int) c));
        return out.toString();
    }

    public static void main(String[] args) throws IOException {
        Properties properties = new Properties();
        try (Reader reader = new InputStreamReader(new FileInputStream(args[0]), StandardCharsets.UTF_8)) {
            properties.load(reader);
        }
        for (String name : new TreeSet<>(properties.stringPropertyNames())) {
            System.out.println(hex(name) + " " + hex(properties.getProperty(name)));
        }
    }
}
"""

HARD = {
    "spark.plain": "value",
    "spark.separators": "a=b:c d",
    "spark.comment": "#not a comment! !either",
    "spark.leading": "   three spaces first",
    "spark.trailing": "spaces after   ",
    "spark.breaks": "one\ntwo\r\nthree\tfour\ffive",
    "spark.backslashes": "C:\\dir\\new\\table \\u0041 \\",
    "spark.unicode": "ünïcødé ✓ 漢字 😀",
    "spark.empty": "",
    "spark.ssl.keyPassword": "p@ss=w:rd#!\\ ",
    "key with spaces=and:colons#!": "v",
    " leading key": "x",
}


def _decode(hex_text: str) -> str:
    return "".join(chr(int(hex_text[i : i + 4], 16)) for i in range(0, len(hex_text), 4)).encode(
        "utf-16", "surrogatepass"
    ).decode("utf-16")


@pytest.mark.skipif(shutil.which("java") is None, reason="needs a JVM (Spark needs one too)")
def test_java_reads_back_every_value_exactly(tmp_path):
    path = write_properties(tmp_path / "conf.properties", HARD)
    (tmp_path / "ReadProperties.java").write_text(READER)
    result = subprocess.run(  # noqa: S603 - a fixed command: java and two files this test wrote
        ["java", str(tmp_path / "ReadProperties.java"), str(path)],  # noqa: S607 - java from PATH, as Spark finds it
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    read = {}
    for line in result.stdout.splitlines():
        name, _, value = line.partition(" ")
        read[_decode(name)] = _decode(value)
    assert read == HARD
