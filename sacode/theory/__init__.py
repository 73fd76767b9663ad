"""Theory (chapters 2-10): closed-form data laws and rewards, the control problem whose action is the score (with the
one rollout loop), the Girsanov KL, optimal control in closed form, the affine policy family with exact policy
evaluation, and the exact optimum of the K-step problem. Everything here is checked against closed forms."""
