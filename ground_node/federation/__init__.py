"""The federation room (ARCHITECTURE §2, §4.5, §11): the outbox and upload planning, the uplink, hand-over pulls and the
client side of each strategy. No torch: a test imports every module here and checks it."""
