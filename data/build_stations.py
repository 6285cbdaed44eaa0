"""Rebuild `stations.csv`, the station list that `preprocess.py` resolves names and coordinates with.

Rows come from two sources, in this order of precedence for a name:
1. every (id, name) pair seen in the bundled 2023 trips, the model's own vocabulary of ids;
2. the Bike Share Toronto GBFS `station_information` snapshot of 2019-02-22, the closest to 2017's names,
   which also gives coordinates.
Some ids were given to another station between 2019 and 2023 (7001 was `Lower Jarvis St / The Esplanade`,
then `Wellesley Station Green P`). The snapshot's row for such an id is left out, and its coordinates are
not given to the 2023 station: an unknown station is better than a wrong one.
Run from the repository root: `python data/build_stations.py`.
"""

import sys
from pathlib import Path

import pandas as pd

DATA_DIR = Path(__file__).parent
sys.path.insert(0, str(DATA_DIR.parent))

from preprocess import loose_station_key  # noqa: E402


def main() -> None:
    gbfs = pd.read_csv(DATA_DIR / "stations-gbfs-2019-02-22.csv")
    gbfs = gbfs[["station_id", "name", "lat", "lon"]]
    gbfs["source"] = "gbfs-2019-02-22"

    pairs = []
    for path in sorted(DATA_DIR.glob("bikeshare-ridership-2023-*.csv.gz")):
        trips = pd.read_csv(path, encoding="utf-8-sig", na_values=["NULL"])
        for end in ("Start", "End"):
            ends = trips[[f"{end} Station Id", f"{end} Station Name"]].dropna()
            ends.columns = ["station_id", "name"]
            pairs.append(ends)
    seen = pd.concat(pairs)
    seen = seen[~seen["name"].str.contains("\ufffd")]
    seen = seen.groupby(["station_id", "name"]).size().rename("trips").reset_index()
    seen = seen.sort_values(["trips", "station_id"], ascending=[False, True]).drop(columns="trips")
    seen["station_id"] = seen["station_id"].astype(int)
    keys_2023 = seen.assign(key=seen["name"].map(loose_station_key)).groupby("station_id")["key"].agg(set)
    gbfs_keys = gbfs.set_index("station_id")["name"].map(loose_station_key)
    reassigned = [i for i, key in gbfs_keys.items() if i in keys_2023.index and key not in keys_2023[i]]
    gbfs = gbfs[~gbfs["station_id"].isin(reassigned)]
    print(f"left out {len(reassigned)} snapshot ids that 2023 gives to another station")
    coordinates = gbfs.set_index("station_id")[["lat", "lon"]]
    seen = seen.join(coordinates, on="station_id")
    seen["source"] = "trips-2023"

    stations = pd.concat([seen, gbfs], ignore_index=True)
    stations.to_csv(DATA_DIR / "stations.csv", index=False)
    print(f"wrote {len(stations)} rows for {stations['station_id'].nunique()} station ids")


if __name__ == "__main__":
    main()
