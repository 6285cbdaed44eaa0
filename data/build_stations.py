"""Rebuild `stations.csv`, the station list `bikeshare_membership/stations.py` resolves names and coordinates with.

Rows come from three sources, in this order of precedence for a name:
1. every (id, name) pair seen in the bundled 2023 trips, the model's own vocabulary of ids;
2. the Bike Share Toronto GBFS `station_information` snapshot of 2019-02-22, the closest to 2017's names;
3. the snapshot of 2025-07-07, the only one with the stations opened since 2019.
Some ids were given to another station between two of these (7001 was `Lower Jarvis St / The Esplanade` in
2019, `Wellesley Station Green P` in 2023; 7322 `King St W / Brant St` in 2023 is `East Liberty St / Western
Battery Rd` in 2025). So a snapshot row is kept only when its name agrees (`names_agree`) with a name the id
already has: its 2023 names, or for an id missing from the trips its 2019 name. A row that disagrees is left
out and its coordinates go to no one: an unknown station is better than a wrong one.

A 2023 id takes the coordinates of the 2025 snapshot when that agrees, as it is nearer to the trips (two years
after them, where 2019 is four years before); else those of the 2019 snapshot when that agrees (where 2025 names
another place, the change came after 2023, sometimes with a move, so 2019 has the place the 2023 name describes);
else none. The distance between the two snapshots decides nothing: where 2019 agrees its own coordinates are
used, and where neither agrees, two places close to each other still need not be the 2023 one.
`source` is the row's origin, then `+` the snapshot its coordinates come from when that is another.
Run from the repository root: `python data/build_stations.py`.
"""

import re
import unicodedata
from itertools import permutations
from pathlib import Path

import pandas as pd

from bikeshare_membership.stations import loose_station_key

DATA_DIR = Path(__file__).parent


STATIONS_FILE = DATA_DIR / "stations.csv"
_REMARK = re.compile(r"\(.*?\)")
_GENERIC_WORDS = {"st", "ave", "rd", "blvd", "dr", "cr", "trail", "smart", "subway", "station"}


def cross_streets(name: str) -> list[str]:
    """The distinctive letters of each part of a name: `Hayter St / La Plante Ave` -> `hayter`, `laplante`.

    Remarks in brackets (`(Ryerson University)` -> `(TMU)`), accents, street types, `SMART` and compass
    directions are dropped, and words joined, as the feed writes them either way (`Rail Path`, `Railpath`).
    """
    plain = unicodedata.normalize("NFKD", _REMARK.sub(" ", name)).encode("ascii", "ignore").decode()
    parts = loose_station_key(plain).split("/")
    return ["".join(word for word in part.split() if word not in _GENERIC_WORDS) for part in parts]


def spelled_alike(word: str, other: str) -> bool:
    """Equal but for one letter added, dropped, changed or moved (`bridgeman`, `bridgman`); numbers exactly."""

    def variants(text: str) -> set[str]:
        return {text} | {text[:i] + text[i + 1 :] for i in range(len(text))}

    return re.findall(r"\d+", word) == re.findall(r"\d+", other) and bool(variants(word) & variants(other))


def names_agree(name: str, other: str) -> bool:
    """Whether two names give the same cross streets, in any order, each spelled alike."""
    ours, theirs = cross_streets(name), cross_streets(other)
    return len(ours) == len(theirs) and any(all(map(spelled_alike, ours, order)) for order in permutations(theirs))


def read_trips() -> pd.DataFrame:
    frames = [
        pd.read_csv(path, encoding="utf-8-sig", na_values=["NULL"])
        for path in sorted(DATA_DIR.glob("bikeshare-ridership-2023-*.csv.gz"))
    ]
    return pd.concat(frames, ignore_index=True)


def names_in(trips: pd.DataFrame) -> pd.DataFrame:
    """Every (id, name) pair of the trips' ends, the most used first."""
    pairs = []
    for end in ("Start", "End"):
        ends = trips[[f"{end} Station Id", f"{end} Station Name"]].dropna()
        ends.columns = ["station_id", "name"]
        pairs.append(ends)
    seen = pd.concat(pairs)
    seen = seen[~seen["name"].str.contains("\ufffd")]
    seen = seen.groupby(["station_id", "name"]).size().rename("trips").reset_index()
    seen = seen.sort_values(["trips", "station_id"], ascending=[False, True]).drop(columns="trips")
    seen["station_id"] = seen["station_id"].astype(int)
    return seen


def read_snapshot(file_name: str) -> pd.DataFrame:
    snapshot = pd.read_csv(DATA_DIR / file_name, usecols=["station_id", "name", "lat", "lon"])
    return snapshot.assign(source=file_name.removeprefix("stations-").removesuffix(".csv"))


def agreeing_rows(snapshot: pd.DataFrame, known_names: dict[int, list[str]]) -> pd.DataFrame:
    """The snapshot rows whose id is new or whose name agrees with one of the id's known names."""
    agrees = [
        station_id not in known_names or any(names_agree(name, known) for known in known_names[station_id])
        for station_id, name in zip(snapshot["station_id"], snapshot["name"], strict=True)
    ]
    left_out = snapshot[[not agree for agree in agrees]]
    print(f"{snapshot['source'].iloc[0]}: left out {len(left_out)} ids known by another name:")
    for row in left_out.itertuples():
        print(f"  {row.station_id} {row.name!r} (known as {' | '.join(known_names[row.station_id])!r})")
    return snapshot[agrees]


def print_coverage(trips: pd.DataFrame, when: str) -> None:
    """How many of the trips' station ends have coordinates in `stations.csv`, the distance features' reach."""
    located = pd.read_csv(STATIONS_FILE).dropna(subset=["lat", "lon"])["station_id"]
    start, end = trips["Start Station Id"].isin(located), trips["End Station Id"].isin(located)
    print(
        f"{when}: {pd.concat([start, end]).mean():.1%} of the 2023 trips' station ends have coordinates, "
        f"{(start & end).mean():.1%} of the trips at both ends"
    )


def main() -> None:
    trips = read_trips()
    print_coverage(trips, "before")
    seen = names_in(trips)
    names_2023 = seen.groupby("station_id")["name"].agg(list).to_dict()
    gbfs_2019 = agreeing_rows(read_snapshot("stations-gbfs-2019-02-22.csv"), names_2023)
    names_2019 = gbfs_2019.groupby("station_id")["name"].agg(list).to_dict()
    gbfs_2025 = agreeing_rows(read_snapshot("stations-gbfs-2025-07-07.csv"), names_2019 | names_2023)

    nearest_first = pd.concat([gbfs_2025, gbfs_2019]).drop_duplicates("station_id").set_index("station_id")
    seen = seen.join(nearest_first[["lat", "lon", "source"]], on="station_id")
    seen["source"] = "trips-2023" + ("+" + seen["source"]).fillna("")

    stations = pd.concat([seen, gbfs_2019, gbfs_2025], ignore_index=True)
    stations.to_csv(STATIONS_FILE, index=False)
    print(f"wrote {len(stations)} rows for {stations['station_id'].nunique()} station ids")
    print_coverage(trips, "after")


if __name__ == "__main__":
    main()
