"""One date format and one delimiter per price CSV: detected, or refused with a one-line error."""

from __future__ import annotations

import pandas as pd
import pytest

from modality.stock.data.csvformat import detect_date_format, sniff_delimiter
from modality.stock.data.prices import load_source, read_csv

ROW = "1,2,1,1.5,10"  # Open,High,Low,Close,Volume


def write(tmp_path, dates, sep=",", name="T.csv", header="Date,Open,High,Low,Close,Volume"):
    p = tmp_path / name
    p.write_text("\n".join([header.replace(",", sep)] + [f"{d}{sep}{ROW.replace(',', sep)}" for d in dates]) + "\n")
    return p


def error(fn, *args, **kw) -> str:
    with pytest.raises(ValueError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_iso_dates_detected(tmp_path):
    cells = ["2020-01-02", "2020-01-03", "2020-02-03"]
    df = read_csv(write(tmp_path, cells))
    assert list(df.index) == list(pd.to_datetime(cells))
    assert detect_date_format(pd.Series(cells), [2, 3, 4], "x") == "%Y-%m-%d"


def test_us_month_day_file_with_a_day_over_12_detected(tmp_path):
    # 01/02 alone could be 1 Feb; 01/13 makes the whole file month-first
    cells = ["01/02/2020", "01/03/2020", "01/13/2020"]
    df = read_csv(write(tmp_path, cells))
    assert list(df.index) == list(pd.to_datetime(["2020-01-02", "2020-01-03", "2020-01-13"]))
    assert detect_date_format(pd.Series(cells), [2, 3, 4], "x") == "%m/%d/%Y"


def test_day_month_file_detected_not_swapped(tmp_path):
    # every row sorts either way, so no order check would catch a day/month swap here
    df = read_csv(write(tmp_path, ["02/01/2020", "03/01/2020", "13/01/2020"]))
    assert list(df.index) == list(pd.to_datetime(["2020-01-02", "2020-01-03", "2020-01-13"]))


def test_all_days_up_to_12_refused_as_ambiguous_naming_the_line(tmp_path):
    p = write(tmp_path, ["01/01/2020", "01/02/2020", "01/03/2020"])
    msg = error(read_csv, p)
    assert msg.startswith(f"{p}: line 3: ambiguous dates: '01/02/2020'")  # line 2 reads the same either way
    assert "'%m/%d/%Y'" in msg and "'%d/%m/%Y'" in msg and "date_format=" in msg


def test_explicit_date_format_resolves_ambiguity(tmp_path):
    p = write(tmp_path, ["01/01/2020", "01/02/2020", "01/03/2020"])
    us = read_csv(p, date_format="%m/%d/%Y")
    assert list(us.index) == list(pd.to_datetime(["2020-01-01", "2020-01-02", "2020-01-03"]))
    eu = load_source(p, date_format="%d/%m/%Y")["T"]
    assert list(eu.index) == list(pd.to_datetime(["2020-01-01", "2020-02-01", "2020-03-01"]))


def test_bad_cell_with_explicit_format_names_line_value_and_format(tmp_path):
    p = write(tmp_path, ["02/01/2020", "2020-01-03", "06/01/2020"])
    msg = error(read_csv, p, date_format="%d/%m/%Y")
    assert msg == f"{p}: line 3: date '2020-01-03' does not match date_format='%d/%m/%Y'"


def test_no_format_fits_names_line_and_value(tmp_path):
    p = write(tmp_path, ["2020-01-02", "2020-01-03", "Jan 6 2020"])
    msg = error(read_csv, p)
    assert msg.startswith(f"{p}: line 4: unparsable date 'Jan 6 2020'") and "date_format=" in msg


def test_mixed_formats_in_one_file_refused(tmp_path):
    """Cell-by-cell parsing read each of these; one file has one format."""
    p = write(tmp_path, ["2020-01-02", "01/03/2020", "01/06/2020"])
    assert f"{p}: line 2: unparsable date '2020-01-02'" in error(read_csv, p)


def test_yfinance_offsets_keep_wall_clock_dates_across_dst(tmp_path):
    p = write(tmp_path, ["2020-03-06 00:00:00-05:00", "2020-03-09 00:00:00-04:00", "2020-03-10 00:00:00-04:00"])
    df = read_csv(p)
    assert list(df.index) == list(pd.to_datetime(["2020-03-06", "2020-03-09", "2020-03-10"]))
    assert list(read_csv(p, date_format="%Y-%m-%d %H:%M:%S%z").index) == list(df.index)


@pytest.mark.parametrize("sep", [";", "\t", "|"])
def test_semicolon_tab_and_pipe_files_read(tmp_path, sep):
    df = read_csv(write(tmp_path, ["2020-01-02", "2020-01-03"], sep=sep))
    assert df["Close"].tolist() == [1.5, 1.5] and len(df) == 2


def test_missing_column_error_names_delimiter_and_header(tmp_path):
    p = write(tmp_path, ["2020-01-02"], sep=";", header="Date,Open,High,Low,Price,Volume")
    msg = error(read_csv, p)
    assert msg.startswith(f"{p}: missing column(s) ['Close']; header read with delimiter ';': ['Date', 'Open', 'High', 'Low', 'Price', 'Volume']")


def test_sniffer_falls_back_to_comma():
    assert sniff_delimiter("Date\n") == ","
    assert sniff_delimiter("") == ","
    assert sniff_delimiter('"Date";"Open";"Close"\r\n') == ";"


def test_date_format_travels_from_config_to_the_reader(tmp_path):
    """conf/modality/stock.yaml's date_format reaches the plugin and the data modules as a plain argument."""
    from omegaconf import OmegaConf

    from modality.stock.data.datamodule import csv_records
    from modality.stock.plugin import StockModality

    days = [d for d in pd.bdate_range("2020-01-01", "2021-12-31") if d.day <= 12][:100]
    p = write(tmp_path, [d.strftime("%d/%m/%Y") for d in days], name="DM.csv")
    assert "ambiguous dates" in error(read_csv, p)
    root = OmegaConf.create({"modality": OmegaConf.load("conf/modality/stock.yaml")})
    root.modality.date_format = "%d/%m/%Y"
    for name in ("stock_align", "stock_forecast"):
        root.data = OmegaConf.load(f"conf/data/{name}.yaml")
        assert root.data.date_format == "%d/%m/%Y", name
    m = StockModality(d_llm=None, context=64, horizon=5, patch_len=8, stride=4, d_model=16, n_heads=2, n_layers=1,
                      d_ff=16, date_format=root.modality.date_format)
    assert m.load({"csv": str(p)}).index[-1] == days[-1]
    end = csv_records(p, 64, n_windows=1, date_format="%d/%m/%Y")[0]["stock"][0]["end"]
    assert pd.Timestamp(end) in set(days)
