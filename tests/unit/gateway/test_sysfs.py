"""sysfs sources against fake trees: hwmon, thermal, IIO, 1-Wire DS18B20."""

from __future__ import annotations

import os

import pytest

from saltext.tributary.gateway.sources.sysfs import (
    SysfsConfigError,
    SysfsSource,
    compile_sources,
    crc8_dallas,
    discover,
    parse_w1_slave,
)
from saltext.tributary.protocol.reading import RejectedReading

NOW = 1_700_000_000_000


def put(root, rel, text):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text)


def w1_text(raw_temp: int, *, good_crc=True, yes=True, milli=None):
    scratch = bytearray(
        raw_temp.to_bytes(2, "little", signed=True) + bytes([0x4B, 0x46, 0x7F, 0xFF, 0x0C, 0x10])
    )
    crc = crc8_dallas(bytes(scratch))
    if not good_crc:
        crc ^= 0x01
    hexes = " ".join(f"{b:02x}" for b in [*scratch, crc])
    milli = raw_temp * 625 // 10 if milli is None else milli
    return f"{hexes} : crc={crc:02x} {'YES' if yes else 'NO'}\n{hexes} t={milli}\n"


@pytest.fixture
def tree(tmp_path):
    root = str(tmp_path)
    # hwmon: a chip with labels and every kind
    put(root, "sys/class/hwmon/hwmon0/name", "nct6775\n")
    put(root, "sys/class/hwmon/hwmon0/temp1_input", "45000\n")
    put(root, "sys/class/hwmon/hwmon0/temp1_label", "CPU Temp\n")
    put(root, "sys/class/hwmon/hwmon0/temp2_input", "38500\n")
    put(root, "sys/class/hwmon/hwmon0/in0_input", "1208\n")
    put(root, "sys/class/hwmon/hwmon0/in0_label", "Vcore\n")
    put(root, "sys/class/hwmon/hwmon0/fan1_input", "1450\n")
    put(root, "sys/class/hwmon/hwmon0/power1_input", "12500000\n")
    # thermal zone
    put(root, "sys/class/thermal/thermal_zone0/type", "cpu-thermal\n")
    put(root, "sys/class/thermal/thermal_zone0/temp", "51234\n")
    # IIO: bme280 with processed temp, raw+scale+offset pressure-less adc, shared scale
    dev = "sys/bus/iio/devices/iio:device0"
    put(root, f"{dev}/name", "bme280\n")
    put(root, f"{dev}/in_temp_input", "23450\n")
    put(root, f"{dev}/in_humidityrelative_input", "41250\n")
    put(root, f"{dev}/in_pressure_input", "101.325\n")
    adc = "sys/bus/iio/devices/iio:device1"
    put(root, f"{adc}/name", "ads1015\n")
    put(root, f"{adc}/in_voltage0_raw", "1000\n")
    put(root, f"{adc}/in_voltage0_scale", "2.0\n")
    put(root, f"{adc}/in_voltage1_raw", "100\n")
    put(root, f"{adc}/in_voltage_scale", "3.0\n")
    put(root, f"{adc}/in_voltage_offset", "-10\n")
    tmp = "sys/bus/iio/devices/iio:device2"
    put(root, f"{tmp}/name", "tmp117\n")
    put(root, f"{tmp}/in_temp_raw", "3000\n")
    put(root, f"{tmp}/in_temp_scale", "7.8125\n")
    # 1-Wire
    put(root, "sys/bus/w1/devices/28-000005e2fdc3/w1_slave", w1_text(0x0191))  # 25.0625 C
    put(root, "sys/bus/w1/devices/28-0000deadbeef/w1_slave", w1_text(0x0191, good_crc=False))
    put(root, "sys/bus/w1/devices/28-00000000085c/w1_slave", w1_text(0x0550))  # 85 C power-on
    put(root, "sys/bus/w1/devices/w1_bus_master1/w1_master_name", "w1_bus_master1\n")
    return root


ALL = [{"kind": k} for k in ("hwmon", "thermal", "iio", "w1")]


def values(readings):
    return {r.key: (round(r.value, 4), r.unit) for r in readings}


def test_every_kind(tree):
    src = SysfsSource(tree, compile_sources(ALL))
    readings, rejects = src.poll(NOW, mono=0.0)
    assert values(readings) == {
        "nct6775-CPU_Temp/temperature": (45.0, "C"),
        "nct6775-temp2/temperature": (38.5, "C"),
        "nct6775-Vcore/voltage": (1.208, "V"),
        "nct6775-fan1/fan": (1450.0, "rpm"),
        "nct6775-power1/power": (12.5, "W"),
        "cpu-thermal/temperature": (51.234, "C"),
        "bme280/temperature": (23.45, "C"),
        "bme280/humidity": (41.25, "%"),
        "bme280/pressure": (101.325, "kPa"),
        "ads1015-voltage0/voltage": (1.98, "V"),  # (1000 - 10 shared offset) * 2.0 mV
        "ads1015-voltage1/voltage": (0.27, "V"),  # (100 - 10) * 3.0 mV
        "tmp117/temperature": (23.4375, "C"),  # 3000 * 7.8125 m°C
        "28-000005e2fdc3/temperature": (25.062, "C"),
    }
    assert sorted(e.reason for e in rejects) == ["w1_crc", "w1_power_on"]
    assert all(r.ts_ms == NOW for r in readings)


def test_per_sensor_intervals(tree):
    src = SysfsSource(
        tree,
        compile_sources(
            [
                {"kind": "thermal", "interval_s": 30},
                {"kind": "hwmon", "interval_s": 5, "match": "*/fan"},
            ]
        ),
    )
    keys = lambda rs: sorted(r.key for r in rs)  # noqa: E731
    assert keys(src.poll(NOW, 100.0)[0]) == ["cpu-thermal/temperature", "nct6775-fan1/fan"]
    assert keys(src.poll(NOW, 104.0)[0]) == []
    assert keys(src.poll(NOW, 105.0)[0]) == ["nct6775-fan1/fan"]
    assert keys(src.poll(NOW, 130.0)[0]) == ["cpu-thermal/temperature", "nct6775-fan1/fan"]
    assert keys(src.poll(NOW, 131.0, force=True)[0]) == [
        "cpu-thermal/temperature",
        "nct6775-fan1/fan",
    ]
    assert keys(src.poll(NOW, 131.0, force=True, match="cpu-*")[0]) == ["cpu-thermal/temperature"]


def test_unreadable_and_garbage_values_are_rejected(tree):
    put(tree, "sys/class/thermal/thermal_zone0/temp", "garbage\n")
    os.remove(os.path.join(tree, "sys/class/hwmon/hwmon0/fan1_input"))
    src = SysfsSource(tree, compile_sources([{"kind": "thermal"}]))
    readings, rejects = src.poll(NOW, 0.0)
    assert readings == [] and [e.reason for e in rejects] == ["not_numeric"]
    # a file vanishing between discovery and read is a read_error
    src = SysfsSource(tree, compile_sources([{"kind": "hwmon"}]))
    src._refresh(0.0)
    os.remove(os.path.join(tree, "sys/class/hwmon/hwmon0/temp2_input"))
    _, rejects = src.poll(NOW, 0.0)
    assert [e.reason for e in rejects] == ["read_error"]


def test_empty_tree_finds_nothing(tmp_path):
    assert discover(str(tmp_path), compile_sources(ALL)) == []


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "w1_format"),
        ("garbage", "w1_format"),
        ("zz 01 : crc=57 YES\nzz t=1\n", "w1_format"),
        ("72 01 : crc=57 YES\n72 01 t=1\n", "w1_format"),
    ],
)
def test_w1_malformed(text, why):
    with pytest.raises(RejectedReading) as info:
        parse_w1_slave(text)
    assert info.value.reason == why


def test_w1_parse_and_checks():
    assert parse_w1_slave(w1_text(-0x0092)) == pytest.approx(-9.125)  # 0xFF6E negative
    with pytest.raises(RejectedReading, match="w1_crc"):
        parse_w1_slave(w1_text(0x0191, yes=False))
    with pytest.raises(RejectedReading, match="w1_power_on"):
        parse_w1_slave(w1_text(0x0550))
    # Maxim application note 27 example ROM: CRC of 02 1C B8 01 00 00 00 is A2
    assert crc8_dallas(bytes([0x02, 0x1C, 0xB8, 0x01, 0x00, 0x00, 0x00])) == 0xA2


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ([], r"sources"),
        ([{"kind": "gpio"}], r"sources\[0\].kind"),
        ([{"kind": "w1", "interval_s": 0}], r"sources\[0\].interval_s"),
        ([{"kind": "w1", "match": 3}], r"sources\[0\].match"),
        ([{"kind": "w1", "speed": 3}], r"sources\[0\].speed"),
        (["w1"], r"sources\[0\]"),
    ],
)
def test_bad_source_config_names_key(raw, key):
    with pytest.raises(SysfsConfigError, match=key):
        compile_sources(raw)
