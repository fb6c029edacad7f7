"""Names that cross the wire between ServerApp and ClientApp, defined once.

Record keys in a Message's RecordDict, and metric keys in its MetricRecords. Everything a
client sends back is listed here: the DP-trained weights and these metrics, nothing else.
"""

ARRAYS = "arrays"  # ArrayRecord: global weights (to clients) / trained weights (to server)
CONFIG = "config"  # ConfigRecord: the run's resolved config plus ROUND
METRICS = "metrics"  # MetricRecord in every reply

ROUND = "server-round"  # injected by Flower's strategies into CONFIG
PARTITIONS = "partitions"  # simulation: in CONFIG, the partition each slot serves (-1: none)

# Train replies
NUM_EXAMPLES = "num-examples"  # training records (FedAvg weight); eval: units averaged over
UNIT_WEIGHT = "unit-weight"  # always 1: the equal weights user-level DP-FedAvg needs
TRAIN_LOSS = "train-loss"
EPSILON = "epsilon"  # the site's cumulative record-level epsilon after this round
NOISE_MULTIPLIER = "noise-multiplier"
STEPS = "steps"

# Error codes of replies that carry no update
DECLINED_BUDGET = 4030  # the site's privacy budget does not allow this round
DECLINED_POLICY = 4031  # the site refuses the run's settings (e.g. no record-level DP)
DROPPED_OUT = 5030  # injected fault (simulation): the site failed after training
